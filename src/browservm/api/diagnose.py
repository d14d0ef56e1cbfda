"""Diagnosis (issue 11): GET /v1/doctor and GET /v1/vms/{id}/diagnose over the doctor's hops.

Both answer with the JSON of `browservm doctor --json` (doctor/report.py), operator key required.
The doctor is async and its blocking reads run in threads of their own: the event loop never waits.
An unknown VM is a 404 and a malformed id a 422, through the app's one error mapping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Depends
from fastapi.responses import JSONResponse

from browservm.api.auth import admin_only
from browservm.api.models import VmId
from browservm.doctor import Doctor, DriverVmms, Sources
from browservm.doctor.local import plan_of
from browservm.hostnet.host import Check
from browservm.ids import validate_vm_id

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService

def service_sources(service: ControllerService) -> Sources:
    """The doctor looks through the service's own parts: its host network, records and VMM driver."""
    settings = service.settings
    network = service.network
    driver = service.manager.driver
    def status() -> list[Check]:
        # Looked up when asked, not at mount: a service may be built on network parts without a status().
        return network.status()

    # The plan from settings, as the controller built its network's: the service's parts stay opaque here.
    return Sources(plan=plan_of(settings), netns=network.netns, vmm_choice=settings.vmm, accel=settings.accel,
                   kernel=settings.kernel, rootfs=settings.rootfs, status=status, record=service.manager.get,
                   records=service.manager.all, vmms=DriverVmms(getattr(driver, "jail_root", None)),
                   expected=getattr(network, "expected", None))


def mount(app: FastAPI, service: ControllerService) -> None:
    """Add this part's routes to `app`, and its tasks to `service` (`run_in_background`, `on_stop`)."""
    doctor = Doctor(service_sources(service))

    @app.get("/v1/doctor", tags=["doctor"], dependencies=[Depends(admin_only)])
    async def host_doctor() -> JSONResponse:
        """The host's pieces: namespace, bridge, forwarding, nftables, uplink, VMM, kernel and image."""
        return JSONResponse((await doctor.host()).to_json())

    @app.get("/v1/vms/{vm_id}/diagnose", tags=["doctor"], dependencies=[Depends(admin_only)])
    async def diagnose_vm(vm_id: VmId) -> JSONResponse:
        """One VM's hops in order, stopping at the first broken one: verdict, hop, cause, evidence, fix."""
        return JSONResponse((await doctor.vm(validate_vm_id(vm_id))).to_json())
