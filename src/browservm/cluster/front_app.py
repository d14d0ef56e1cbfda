"""A front's HTTP API: `/v1/vms` and `/v1/hosts` over a Front (front.py), the operator's key required.

The record and Ray block, so every call goes to a thread; the hosts' watch is one task owned by the
app's lifespan, cancelled on the way out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from browservm import __version__
from browservm.api.app import BodyLimit, answer_errors
from browservm.api.auth import require_operator
from browservm.api.models import CreateVm, ErrorOut
from browservm.cluster.errors import RecordUnavailable
from browservm.cluster.front import Front, PlacedVm
from browservm.cluster.record import Host, Vm
from browservm.ids import validate_vm_id

log = logging.getLogger("browservm.front")
WATCH_EVERY_S = 1.0
T = TypeVar("T")


class ClusterVmOut(BaseModel):
    vm_id: str
    host: str = Field(description="the host the VM was placed on")
    placement: str = Field(description="pending (its host is making it), running (its host has it) or lost")
    placement_reason: str
    user: str
    created_at: datetime
    detail: dict[str, Any] | None = Field(description="the VM as its host describes it (state, hops, failure)")
    detail_error: str | None = Field(description="why the host could not be asked, when it could not")

    @classmethod
    def of(cls, vm: Vm, detail: dict[str, Any] | None = None, error: str | None = None) -> ClusterVmOut:
        return cls(vm_id=vm.vm_id, host=vm.host, placement=vm.state, placement_reason=vm.state_reason,
                   user=vm.owner, created_at=vm.created_at, detail=detail, detail_error=error)


class HostOut(BaseModel):
    name: str
    state: str = Field(description="ready, suspect, lost or draining")
    state_reason: str
    capacity: int
    allocated: int
    pending: int
    heartbeat_at: datetime
    viewer_address: str

    @classmethod
    def of(cls, host: Host) -> HostOut:
        return cls(name=host.name, state=host.state, state_reason=host.state_reason, capacity=host.capacity,
                   allocated=host.allocated, pending=host.pending, heartbeat_at=host.heartbeat_at,
                   viewer_address=host.viewer_address)


def build_front_app(front: Front, api_key: str) -> FastAPI:
    async def call(work: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(work, *args)

    async def watch() -> None:
        while True:
            try:
                for change in await call(front.watch):
                    log.warning("%s", change)
            except RecordUnavailable as error:
                log.warning("watching the hosts: %s", error)
            await asyncio.sleep(WATCH_EVERY_S)  # a period: Ray's node table has no change feed to await

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch(), name="watch-hosts")
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)

    app = FastAPI(title="browservm cluster front", version=__version__, lifespan=lifespan,
                  description="The cluster's API: VMs placed on its hosts, and the hosts.")
    app.add_middleware(BodyLimit)
    answer_errors(app)
    authorized = [Depends(require_operator(api_key))]
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 404, 409, 422, 429, 502,
                                                                                     503)}

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.post("/v1/vms", status_code=202, response_model=ClusterVmOut, dependencies=authorized, responses=errors,
              tags=["vms"], operation_id="createVm")
    async def create_vm(body: CreateVm, idempotency_key: Annotated[
            str | None, Header(max_length=128, description="the same key again returns the same VM")] = None,
                        ) -> ClusterVmOut:
        vm = await call(front.create, body.model_dump(), idempotency_key)
        return ClusterVmOut.of(vm)

    @app.get("/v1/vms", response_model=list[ClusterVmOut], dependencies=authorized, responses=errors, tags=["vms"],
             operation_id="listVms")
    async def list_vms() -> list[ClusterVmOut]:
        return [ClusterVmOut.of(vm) for vm in await call(front.all)]

    @app.get("/v1/vms/{vm_id}", response_model=ClusterVmOut, dependencies=authorized, responses=errors,
             tags=["vms"], operation_id="getVm")
    async def get_vm(vm_id: str) -> ClusterVmOut:
        placed: PlacedVm = await call(front.get, validate_vm_id(vm_id))
        return ClusterVmOut.of(placed.vm, placed.detail, placed.detail_error)

    @app.delete("/v1/vms/{vm_id}", dependencies=authorized, responses=errors, tags=["vms"], operation_id="deleteVm")
    async def delete_vm(vm_id: str) -> dict[str, str | bool]:
        await call(front.delete, validate_vm_id(vm_id))
        return {"vm_id": vm_id, "removed": True}

    @app.get("/v1/vms/{vm_id}/viewer", dependencies=authorized, responses=errors, tags=["vms"],
             operation_id="getViewer")
    async def viewer(vm_id: str) -> JSONResponse:
        return JSONResponse(await call(front.viewer, validate_vm_id(vm_id)))

    @app.get("/v1/hosts", response_model=list[HostOut], dependencies=authorized, responses=errors, tags=["hosts"],
             operation_id="listHosts")
    async def hosts() -> list[HostOut]:
        return [HostOut.of(host) for host in await call(front.hosts)]

    @app.post("/v1/hosts/{name}/drain", response_model=HostOut, dependencies=authorized, responses=errors,
              tags=["hosts"], operation_id="drainHost")
    async def drain(name: str) -> HostOut:
        return HostOut.of(await call(front.drain, name))

    @app.post("/v1/hosts/{name}/resume", response_model=HostOut, dependencies=authorized, responses=errors,
              tags=["hosts"], operation_id="resumeHost")
    async def resume(name: str) -> HostOut:
        return HostOut.of(await call(front.resume, name))

    return app
