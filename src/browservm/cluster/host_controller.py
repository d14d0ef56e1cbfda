"""A host's VMs in a cluster: the single-host controller (`browservm serve`), run inside the host's agent.

The agent's process holds what `serve` would: the state directory's lock, the host network, the
store, the service with its warm pool, snapshots, reaper and viewer proxy, listening on the host's
viewer address. When Ray restarts the agent, this starts again and the service's reconcile
re-adopts the VMs that kept running (their VMMs are not the agent's children).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

from browservm.api.models import CreateVm
from browservm.api.service import ControllerService
from browservm.cli.serve import ServiceServer, listen_socket, service_of, uvicorn_config
from browservm.cluster.token import host_api_key, read_token
from browservm.config import Settings
from browservm.controller import ServeLock, open_controller
from browservm.errors import InvalidInput
from browservm.vm.state import VmState

if TYPE_CHECKING:
    from browservm.cluster.ray_agent import AgentConfig

log = logging.getLogger("browservm.agent")
_GONE = (VmState.ENDED,)


class HostController:
    """HostVms (agent.py) over this host's controller service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._stack = contextlib.ExitStack()
        self._service: ControllerService | None = None
        self._server: asyncio.Task[None] | None = None

    @classmethod
    def of(cls, config: AgentConfig) -> HostController:
        """Its API key comes from the cluster's token: fronts relay VMs' event streams with it."""
        if config.password_file is None:
            raise InvalidInput("password_file", None, "a host's controller needs the cluster's token")
        return cls(Settings(**{**config.settings, "api_key": host_api_key(read_token(config.password_file))}))

    async def start(self) -> None:
        settings = self.settings
        # The process's life is the agent's: what is entered here is released when it ends.
        await asyncio.to_thread(self._stack.enter_context, ServeLock(settings.state_dir))
        listener = await asyncio.to_thread(listen_socket, settings)
        self._stack.callback(listener.close)
        controller = await asyncio.to_thread(self._stack.enter_context, open_controller(settings, serving=True))
        service, _ = await asyncio.to_thread(service_of, controller)
        for action in await service.start():
            log.info("host controller: reconcile: %s", action)
        self._service = service
        server = ServiceServer(uvicorn_config(service), service, signals=False)
        self._server = asyncio.create_task(server.serve(sockets=[listener]), name="host-controller")
        self._server.add_done_callback(_serving_ended)
        log.info("host controller: serving %s, watching %d VM(s)", settings.base_url, len(await service.all()))

    @property
    def service(self) -> ControllerService:
        assert self._service is not None, "start first"
        return self._service

    async def create(self, request: dict[str, Any]) -> str:
        record = await self.service.create(CreateVm(**request), wait=False)
        return record.vm_id

    async def destroy(self, vm_id: str) -> None:
        await self.service.destroy(vm_id)

    async def present(self) -> set[str]:
        return {record.vm_id for record in await self.service.all()
                if record.state not in _GONE and not record.in_pool}

    async def describe(self, vm_id: str) -> dict[str, Any]:
        return self.service.describe(await self.service.get(vm_id)).model_dump(mode="json")

    async def describe_all(self) -> dict[str, dict[str, Any]]:
        return {record.vm_id: self.service.describe(record).model_dump(mode="json")
                for record in await self.service.all() if not record.in_pool}

    async def viewer(self, vm_id: str) -> dict[str, Any]:
        return (await self.service.viewer(vm_id)).model_dump(mode="json")


def _serving_ended(task: asyncio.Task[None]) -> None:
    """The host's API and viewer proxy are gone: an agent heartbeating without them would be a lie. Its
    process ends, and Ray starts the agent again."""
    if not task.cancelled():
        log.error("host controller: its server ended (%s); the agent ends so that Ray starts it again",
                  task.exception() or "without an error")
    os._exit(1)
