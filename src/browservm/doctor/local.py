"""The doctor's sources, from settings: for the CLI (opening the state directory read-mostly) and
for the service (reusing its host network, store and driver)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from browservm.config import Settings
from browservm.controller import plan_for
from browservm.doctor.sources import DriverVmms, Sources
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.netplan import NetworkPlan
from browservm.vm.records import VmRecord, VmRecords


def plan_of(settings: Settings) -> NetworkPlan:
    # The controller's own plan, egress lists included: the firewall it installed is rendered from them.
    return plan_for(settings)


def sources(settings: Settings, *, network: HostNetwork | None, records: VmRecords | None,
            jail_root: Callable[[str], Path | None] | None = None) -> Sources:
    """`network` and `records` are None when the state directory has no database yet: the doctor then
    checks what it can see without one (and says so) instead of creating one."""

    async def record(vm_id: str) -> VmRecord | None:
        return None if records is None else await asyncio.to_thread(records.get, vm_id)

    async def every() -> list[VmRecord]:
        return [] if records is None else await asyncio.to_thread(records.all)

    return Sources(plan=plan_of(settings), netns=NetworkNamespace(settings.netns), vmm_choice=settings.vmm,
                   accel=settings.accel, kernel=settings.kernel, rootfs=settings.rootfs,
                   status=None if network is None else network.status, record=record, records=every,
                   vmms=DriverVmms(jail_root), expected=None if network is None else network.expected)
