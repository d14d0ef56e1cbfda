"""A front's HTTP API: `/v1/vms` and `/v1/hosts` over a Front (front.py), the operator's key required,
and the viewer: its page, its state and its WebSocket, relayed to the VM's host.

A VM reads as the single-host API has it (the host's own VmOut), with `host`, `placement` and
`placement_reason` added; a VM its host has not confirmed yet reads `creating`, a lost one `failed`
with the host as the hop. So `browservm vm create --url FRONT` works as against one host: its event
stream and viewer link are the host's, relayed.

The record and Ray block, so every call goes to a thread; the hosts' watch is one task owned by the
app's lifespan, cancelled on the way out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Annotated, Any, TypeVar
from urllib.parse import urlencode

import httpx
from fastapi import Depends, FastAPI, Header, Query, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from browservm import __version__
from browservm.api.app import NOVNC_DIR, BodyLimit, answer_errors, mount_operator_page, viewer_page
from browservm.api.auth import Access, OneKey, caller, session_key
from browservm.api.logs import AccessLog
from browservm.api.models import CreateVm, ErrorOut, RenewViewer
from browservm.cluster.errors import HostUnreachable, RecordUnavailable
from browservm.cluster.front import Front, PlacedVm
from browservm.cluster.record import Host, Route
from browservm.cluster.routes import RouteCache
from browservm.cluster.viewer_relay import HOST_UNREACHABLE, NO_ROUTE, refuse
from browservm.cluster.viewer_relay import relay as relay_viewer
from browservm.errors import InvalidInput, VmNotFound
from browservm.ids import validate_vm_id

log = logging.getLogger("browservm.front")
WATCH_EVERY_S = 1.0
CALL_THREADS = 32  # each holds its own connection to the record while it works
T = TypeVar("T")


def vm_view(placed: PlacedVm) -> dict[str, Any]:
    vm = placed.vm
    cluster = {"host": vm.host, "placement": vm.state, "placement_reason": vm.state_reason}
    if placed.detail is not None:
        return {**placed.detail, **cluster}
    view: dict[str, Any] = {"vm_id": vm.vm_id, "user": vm.owner, "created_at": vm.created_at.timestamp(), **cluster}
    if vm.state == "pending":
        return {**view, "state": "creating"}
    if vm.state == "lost":
        return {**view, "state": "failed", "failure": {"hop": "host", "reason": vm.state_reason, "hint": "",
                                                       "evidence": [], "vmm_log": [], "cleanup": []}}
    return {**view, "state": "unknown", "detail_error": placed.detail_error}


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


@dataclass(frozen=True)
class Relay:
    """How a front reaches hosts' controllers: their API key (from the cluster's token), the route cache."""

    host_key: str
    routes: RouteCache
    public_url: str  # how browsers reach this front: viewer links point here


def build_front_app(front: Front, api_key: str, relay: Relay) -> FastAPI:
    # The record and Ray block: a pool of their own, wide enough that creates waiting on a dying host (up to
    # their 60 s deadline) do not hold up every other request, and the hosts' watch a thread of its own.
    calls = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="front-call")
    watching = ThreadPoolExecutor(1, thread_name_prefix="front-watch")

    async def call(work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(calls, partial(work, *args))

    async def watch() -> None:
        while True:
            try:
                for change in await asyncio.get_running_loop().run_in_executor(watching, front.watch):
                    log.warning("%s", change)
            except RecordUnavailable as error:
                log.warning("watching the hosts: %s", error)
            except Exception:  # Ray's head restarting, say: the next look tries again
                log.exception("watching the hosts")
            await asyncio.sleep(WATCH_EVERY_S)  # a period: Ray's node table has no change feed to await

    hosts_http = httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), trust_env=False, follow_redirects=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch(), name="watch-hosts")
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await hosts_http.aclose()
            for pool in (calls, watching):
                pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="browservm cluster front", version=__version__, lifespan=lifespan,
                  description="The cluster's API: VMs placed on its hosts, and the hosts.")
    app.add_middleware(BodyLimit)
    app.add_middleware(AccessLog)
    answer_errors(app)
    # One admin key (a front keeps no key ring yet): the cluster's api.key.
    app.state.access = access = Access(OneKey(api_key), session_key(api_key))
    authorized = [Depends(caller)]
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut} for code in (401, 404, 409, 422, 429, 502,
                                                                                     503)}

    async def running_route(vm_id: str) -> Route:
        route = await call(relay.routes.get, validate_vm_id(vm_id))
        if route.state != "running":
            raise VmNotFound(vm_id)
        return route

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        return {"ok": True}

    # --- VMs -------------------------------------------------------------------------------------

    @app.post("/v1/vms", status_code=202, dependencies=authorized, responses=errors, tags=["vms"],
              operation_id="createVm")
    async def create_vm(body: CreateVm, idempotency_key: Annotated[
            str | None, Header(max_length=128, description="the same key again returns the same VM")] = None,
                        ) -> JSONResponse:
        vm = await call(front.create, body.model_dump(), idempotency_key)
        # As a single host answers: the VM is being created (its host's view comes with GET and the events).
        return JSONResponse({**vm_view(PlacedVm(vm, None, None)), "state": "creating"}, status_code=202)

    @app.get("/v1/vms", dependencies=authorized, responses=errors, tags=["vms"], operation_id="listVms")
    async def list_vms() -> list[dict[str, Any]]:
        return [vm_view(placed) for placed in await call(front.all)]

    @app.get("/v1/vms/{vm_id}", dependencies=authorized, responses=errors, tags=["vms"], operation_id="getVm")
    async def get_vm(vm_id: str) -> dict[str, Any]:
        return vm_view(await call(front.get, validate_vm_id(vm_id)))

    @app.delete("/v1/vms/{vm_id}", dependencies=authorized, responses=errors, tags=["vms"], operation_id="deleteVm")
    async def delete_vm(vm_id: str) -> dict[str, str | bool]:
        await call(front.delete, validate_vm_id(vm_id))
        return {"vm_id": vm_id, "removed": True}

    @app.get("/v1/vms/{vm_id}/events", dependencies=authorized, responses=errors, tags=["vms"],
             operation_id="vmEvents", response_class=StreamingResponse)
    async def events(vm_id: str) -> Response:
        """The host's Server-Sent Events of the VM, relayed as they come."""
        route = await running_route(vm_id)
        request = hosts_http.build_request("GET", f"http://{route.viewer_address}/v1/vms/{route.vm_id}/events",
                                           headers={"Authorization": f"Bearer {relay.host_key}"})
        try:
            upstream = await hosts_http.send(request, stream=True)
        except httpx.TransportError as error:
            raise HostUnreachable(route.host, f"{route.viewer_address}: {error or type(error).__name__}") from None
        if upstream.status_code != 200:  # the host's own answer (its VM ended meanwhile, say), as it gave it
            content = await upstream.aread()
            await upstream.aclose()
            return Response(content, status_code=upstream.status_code, media_type="application/json")

        async def lines() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    async def from_host(route: Route, path: str, **params: Any) -> Response:
        """A GET of the host's own API (with the hosts' key), its answer passed on as it is."""
        try:
            answer = await hosts_http.get(f"http://{route.viewer_address}{path}", params=params,
                                          headers={"Authorization": f"Bearer {relay.host_key}"})
        except httpx.TransportError as error:
            raise HostUnreachable(route.host, f"{route.viewer_address}: {error or type(error).__name__}") from None
        return Response(answer.content, status_code=answer.status_code, media_type="application/json",
                        headers={"Cache-Control": "no-store"})

    @app.get("/v1/vms/{vm_id}/console", dependencies=authorized, responses=errors, tags=["vms"],
             operation_id="vmConsole")
    async def console(vm_id: str, lines: Annotated[int, Query(ge=1, le=10_000)] = 50) -> Response:
        """The last lines of the VM's serial console, from its host."""
        route = await running_route(vm_id)
        return await from_host(route, f"/v1/vms/{route.vm_id}/console", lines=lines)

    @app.post("/v1/vms/{vm_id}/viewer", dependencies=authorized, responses=errors, tags=["viewer"],
              operation_id="createViewer")
    async def viewer(vm_id: str) -> dict[str, Any]:
        """A link to the VM's desktop through this front (the host signs its token)."""
        link = await call(front.viewer, validate_vm_id(vm_id))
        # The VM's own id (the one asked may be its reservation's): the link's route is the VM's.
        return {**link, "url": f"{relay.public_url}/view/{link['vm_id']}?token={link['token']}"}

    # --- the viewer: the page here, its state and its WebSocket from the VM's host ----------------

    @app.get("/view/{vm_id}", tags=["viewer"], response_class=HTMLResponse)
    async def view(vm_id: str, token: str = "") -> HTMLResponse:
        return viewer_page()

    @app.get("/view/{vm_id}/state", tags=["viewer"])
    async def view_state(vm_id: str, token: str = "") -> Response:
        try:
            route = await running_route(vm_id)
        except (VmNotFound, InvalidInput):
            return JSONResponse({"error": {"type": "VmNotFound", "message": f"no VM {vm_id[:63]}"}}, status_code=404)
        return await from_host(route, f"/view/{route.vm_id}/state", token=token)

    @app.post("/view/{vm_id}/token", tags=["viewer"])
    async def renew_viewer(vm_id: str, body: RenewViewer) -> Response:
        """An open viewer's next link: the VM's host signs it (it holds the VM's epoch), the link is this front's."""
        try:
            route = await running_route(vm_id)
        except (VmNotFound, InvalidInput):
            return JSONResponse({"error": {"type": "VmNotFound", "message": f"no VM {vm_id[:63]}"}}, status_code=404)
        try:
            answer = await hosts_http.post(f"http://{route.viewer_address}/view/{route.vm_id}/token",
                                           json=body.model_dump())
        except httpx.TransportError as error:
            raise HostUnreachable(route.host, f"{route.viewer_address}: {error or type(error).__name__}") from None
        if answer.status_code != 200:  # the host's refusal (expired, revoked), as it gave it
            return Response(answer.content, status_code=answer.status_code, media_type="application/json")
        link = answer.json()
        return JSONResponse({**link, "url": f"{relay.public_url}/view/{route.vm_id}?token={link['token']}"},
                            headers={"Cache-Control": "no-store"})

    @app.websocket("/v1/vms/{vm_id}/vnc")
    async def vnc(websocket: WebSocket, vm_id: str, token: str = "") -> None:
        try:
            route = await running_route(vm_id)
        except (VmNotFound, InvalidInput):
            await refuse(websocket, NO_ROUTE, f"no VM {vm_id[:63]} running on a host")
            return
        except RecordUnavailable as error:
            await refuse(websocket, HOST_UNREACHABLE, str(error))
            return
        await relay_viewer(websocket, f"ws://{route.viewer_address}/v1/vms/{route.vm_id}/vnc?"
                                      f"{urlencode({'token': token})}", route.host)

    # --- hosts -------------------------------------------------------------------------------------

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

    mount_operator_page(app, access, secure=relay.public_url.startswith("https:"))
    if NOVNC_DIR.is_dir():
        app.mount("/novnc", StaticFiles(directory=NOVNC_DIR), name="novnc")
    return app
