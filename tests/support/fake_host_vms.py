"""A host's VMs for cluster tests at scale: each VM a `sleep` process in a session of its own, not the
agent's child (as a VMM is not), recorded in a file per VM holding its PID and start time. So a
killed agent's successor re-adopts what still runs, and a killed host's VMs are truly gone.

HostVms (browservm.cluster.agent) without guests: the agent, the record, Ray and the fronts are the
real ones. Ray's workers import it by module path: the tests put the repository on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from browservm.errors import BrowserVMError
from browservm.ids import new_vm_id
from browservm.vmm.process import VmmProcess, alive, signal_process, start_time, wait_exit

if TYPE_CHECKING:
    from browservm.cluster.ray_agent import AgentConfig


_DETACHED = ("import subprocess; print(subprocess.Popen(['sleep', '3600'], start_new_session=True, "
             "stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")


class FakeVmFailed(BrowserVMError):
    pass


class FakeHostVms:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @classmethod
    def of(cls, config: AgentConfig) -> FakeHostVms:
        return cls(Path(config.settings["state_dir"]) / "fake-vms")

    async def start(self) -> None:
        await asyncio.to_thread(self.directory.mkdir, parents=True, exist_ok=True)

    def _vmm(self, vm_id: str) -> VmmProcess | None:
        try:
            facts = json.loads((self.directory / vm_id).read_text())
        except FileNotFoundError:
            return None
        return VmmProcess(int(facts["pid"]), int(facts["start_time"]))

    def _create(self, request: dict[str, Any]) -> str:
        if (self.directory / "refuse").exists():  # a test's switch: this host cannot make VMs now
            raise FakeVmFailed("the test made this host refuse")
        deadline = time.monotonic() + 120
        while (self.directory / "slow").exists():  # a test's switch: creates hang until it goes
            if time.monotonic() > deadline:
                raise FakeVmFailed("the test's `slow` switch stayed for 120 s")
            time.sleep(0.1)
        vm_id = new_vm_id()
        # A double fork, as VMMs are spawned: the VM's parent is init, not the agent, so Ray ending the
        # agent's worker (which ends the worker's children) does not end the VM.
        done = subprocess.run([sys.executable, "-c", _DETACHED], capture_output=True, text=True, check=True,
                              timeout=30, stdin=subprocess.DEVNULL)
        pid = int(done.stdout)
        started = start_time(pid)
        assert started is not None
        (self.directory / vm_id).write_text(json.dumps({"pid": pid, "start_time": started,
                                                           "user": request["user"]}))
        return vm_id

    async def create(self, request: dict[str, Any]) -> str:
        return await asyncio.to_thread(self._create, request)

    def _destroy(self, vm_id: str) -> None:
        vmm = self._vmm(vm_id)
        if vmm is not None and signal_process(vmm, signal.SIGTERM) and not wait_exit(vmm, 5):
            signal_process(vmm, signal.SIGKILL)
        (self.directory / vm_id).unlink(missing_ok=True)

    async def destroy(self, vm_id: str) -> None:
        await asyncio.to_thread(self._destroy, vm_id)

    def _present(self) -> set[str]:
        present = set()
        for path in self.directory.iterdir():
            vmm = self._vmm(path.name) if path.name.startswith("vm-") else None
            if vmm is not None and alive(vmm):
                present.add(path.name)
        return present

    async def present(self) -> set[str]:
        return await asyncio.to_thread(self._present)

    async def describe(self, vm_id: str) -> dict[str, Any]:
        vmm = self._vmm(vm_id)
        return {"vm_id": vm_id, "state": "ready" if vmm is not None and alive(vmm) else "ended",
                "pid": None if vmm is None else vmm.pid, "host_pid": os.getpid()}

    async def describe_all(self) -> dict[str, dict[str, Any]]:
        return {vm_id: await self.describe(vm_id) for vm_id in await self.present()}

    async def viewer(self, vm_id: str) -> dict[str, Any]:
        return {"vm_id": vm_id, "url": f"http://fake/{vm_id}"}
