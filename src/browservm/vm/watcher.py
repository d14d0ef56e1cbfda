"""The watcher: a VM whose VMM exits is marked failed at once, and a VM whose creator dies is taken over.

Each watch awaits a process's exit (waiting.ExitWatch, a pidfd): a ready VM's VMM, or the other
controller process that is creating or destroying a VM. Nothing is polled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from browservm.errors import StateConflict
from browservm.vm import hops
from browservm.vm.failures import Failures
from browservm.vm.parts import ManagerParts, owner_alive
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vm.waiting import ExitWatch
from browservm.vmm.process import VmmProcess

LIVE = (VmState.CREATING, VmState.BOOTING, VmState.READY)


class Watcher:
    def __init__(self, parts: ManagerParts, failures: Failures,
                 take_over: Callable[[str], Awaitable[object]]) -> None:
        self._parts = parts
        self._failures = failures
        self._take_over = take_over  # settle a VM whose creator died, as a restart's reconcile would
        self._watched: dict[str, ExitWatch] = {}

    def close(self) -> None:
        for watch in self._watched.values():
            watch.close()
        self._watched.clear()

    def forget(self, vm_id: str) -> None:
        """Stop watching the VM (it is being destroyed on purpose)."""
        watched = self._watched.pop(vm_id, None)
        if watched is not None:
            watched.close()

    async def watch_all(self) -> None:
        """Watch every VM that should be running, and the processes working on VMs, including other ones'."""
        for record in await asyncio.to_thread(self._parts.records.all):
            if record.state == VmState.READY:
                self.watch(record)
            elif record.owner and record.owner != self._parts.me and record.vm_id not in self._watched:
                self.watch_owner(record)

    def watch(self, record: VmRecord) -> None:
        """Mark the VM failed, with its console tail, the moment its VMM exits."""
        if record.vm_id in self._watched or record.pid is None or record.pid_start_time is None:
            return
        watch = ExitWatch(VmmProcess(record.pid, record.pid_start_time))
        self._watched[record.vm_id] = watch
        watch.future.add_done_callback(lambda future: self._exited(record.vm_id, future))

    def watch_owner(self, record: VmRecord) -> None:
        """When the process creating or destroying a VM dies, take over (as a restart's reconcile would)."""
        pid, _, start = record.owner.partition(":")
        if not (pid.isdigit() and start.isdigit()):
            return
        watch = ExitWatch(VmmProcess(int(pid), int(start)))
        self._watched[record.vm_id] = watch

        def owner_gone(future: asyncio.Future[None]) -> None:
            self._watched.pop(record.vm_id, None)
            if not future.cancelled():
                self._parts.own(self._take_over(record.vm_id))
        watch.future.add_done_callback(owner_gone)

    def _exited(self, vm_id: str, future: asyncio.Future[None]) -> None:
        self._watched.pop(vm_id, None)
        if not future.cancelled():
            self._parts.own(self._mark_dead(vm_id, "the VMM process exited"))

    async def _mark_dead(self, vm_id: str, reason: str) -> None:
        parts = self._parts
        record = await asyncio.to_thread(parts.records.get, vm_id)
        if record is None or record.state not in LIVE or (record.owner and owner_alive(record.owner)
                                                           and record.owner != parts.me):
            return
        try:
            await self._failures.record(record, hops.VMM_EXITED, reason, hops.hint(hops.VMM_EXITED))
        except StateConflict:
            return  # destroyed meanwhile: nothing to report
        parts.notices.failure(record)
