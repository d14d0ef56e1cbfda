"""Reconcile: after a (re)start, or when another controller process dies, settle what no live process
is working on, and remove orphans of ours.

Each VM is finished, failed, adopted or watched by its record's state and whether its VMM lives:
a destroy half done is finished; a ready VM whose VMM lives is watched; a booting one whose creator
died is adopted (its readiness hops run again: the console holds all it printed); any other live
one is marked failed and released. Only what carries browservm's marks is touched: records in its
store, TAPs with its alias, leases in its store, directories under its VM root, VMM processes
recognised as VMs of this VM root by their identity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from pathlib import Path

from browservm.errors import BrowserVMError, CleanupFailed, StateConflict
from browservm.ipam import Lease
from browservm.vm import hops
from browservm.vm.bringup import BringUp
from browservm.vm.failures import Failures, next_stage
from browservm.vm.parts import ManagerParts, owner_alive
from browservm.vm.records import VmRecord
from browservm.vm.release import Release, remove_tree
from browservm.vm.state import VmState
from browservm.vm.waiting import uninterrupted
from browservm.vm.watcher import LIVE, Watcher
from browservm.vmdir import vm_directories
from browservm.vmm.process import VmmProcess


class Reconciler:
    def __init__(self, parts: ManagerParts, release: Release, failures: Failures, watcher: Watcher,
                 bringup: BringUp) -> None:
        self._parts = parts
        self._release = release
        self._failures = failures
        self._watcher = watcher
        self._bringup = bringup

    async def reconcile(self) -> list[str]:
        """Settle every VM no live process is working on, and remove orphans of ours; one line per thing done."""
        parts = self._parts
        # What exists is listed before the records are read: every resource is made after its
        # record is written, so a resource listed here has a record in the read below, unless that
        # record was deleted meanwhile, by someone who released its resources.
        taps, leases, vmms, directories = await asyncio.to_thread(self._resources)
        actions, settled = [], set()
        for record in await asyncio.to_thread(parts.records.all):
            if done := await self.reconcile_vm(record.vm_id):
                actions += done
                settled.add(record.vm_id)
        records = await asyncio.to_thread(parts.records.all)
        # Not orphans: what a record holds, and what the reconcile above has just released.
        holding = {record.vm_id for record in records if record.holds_resources} | settled
        known = {record.vm_id for record in records}
        removals: list[tuple[str, Callable[[], object]]] = [
            *((f"orphan VMM {vmm.pid} of {vm_id}", partial(self._release.stop_orphan, vmm, vm_id))
              for vmm, vm_id in vmms.items() if vm_id not in holding),
            *((f"orphan TAP {tap} of {vm_id}", partial(parts.network.remove_tap, vm_id))
              for tap, vm_id in taps.items() if vm_id not in holding),
            *((f"orphan lease {lease.address.ip} of {lease.vm_id}", partial(parts.ipam.release, lease.vm_id))
              for lease in leases if lease.vm_id not in holding),
            *((f"orphan directory {directory}", partial(remove_tree, directory))
              for directory in directories if directory.name not in known)]
        for what, work in removals:
            try:
                await uninterrupted(work)
                actions.append(f"removed {what}")
            except (BrowserVMError, OSError) as exc:
                actions.append(f"could not remove {what}: {exc}")
        return actions

    def _resources(self) -> tuple[dict[str, str], list[Lease], dict[VmmProcess, str], list[Path]]:
        parts = self._parts
        return (parts.network.owned_taps(), parts.ipam.leases(), parts.driver.running(parts.vm_root),
                [files.path for files in vm_directories(parts.vm_root)])

    async def reconcile_vm(self, vm_id: str) -> list[str]:
        """Settle one VM that no live process is working on: finish, fail, adopt or watch it."""
        parts = self._parts
        record = await asyncio.to_thread(parts.records.get, vm_id)
        if record is None:
            return []
        if record.owner and record.owner != parts.me and owner_alive(record.owner):
            self._watcher.watch_owner(record)
            return [f"{vm_id}: {record.state.value} by process {record.owner.split(':')[0]}, left to it"]
        alive = await asyncio.to_thread(self._vmm_alive, record)
        try:
            if record.state == VmState.DESTROYING:
                record.owner = parts.me
                await uninterrupted(partial(parts.records.save, record))
                await self._release.finish_destroy(record)
                return [f"finished {'ending' if record.ended_reason else 'destroying'} {vm_id}"]
            if record.state == VmState.READY and alive:
                self._watcher.watch(record)
                return [f"{vm_id}: VMM {record.pid} alive, watching"]
            if record.state == VmState.BOOTING and alive:
                record.owner = parts.me
                await uninterrupted(partial(parts.records.save, record))
                parts.own(self._adopt(record))
                return [f"{vm_id}: VMM {record.pid} alive, its creator gone: adopted, resuming readiness"]
            if record.state in LIVE:
                hop, reason = (hops.VMM_EXITED, "the VMM exited while no controller watched it") if (
                    record.state == VmState.READY or (record.state == VmState.BOOTING and record.pid)) else (
                    hops.CONTROLLER, f"the process creating it ({record.owner or '?'}) stopped during "
                                     f"{next_stage(record)}")
                await self._failures.record(record, hop, reason, hops.hint(hop))
                return [f"{vm_id}: {reason}: marked failed and released"]
            if record.state == VmState.FAILED and record.holds_resources and not record.keep:
                await self._failures.settle(record)
                if not record.holds_resources:
                    return [f"{vm_id}: released what a failed cleanup had left"]
        except StateConflict:
            return [f"{vm_id}: changed meanwhile, left as it is"]
        except CleanupFailed as exc:
            return [str(exc)]
        return []

    def _vmm_alive(self, record: VmRecord) -> bool:
        if record.pid is None or record.pid_start_time is None:
            return False
        return self._parts.driver.is_vmm_of(VmmProcess(record.pid, record.pid_start_time), Path(record.directory))

    async def _adopt(self, record: VmRecord) -> None:
        """Run the readiness hops again for a VM whose creator died (the console holds all it printed)."""
        await self._bringup.finish(record, self._bringup.readiness(record, lambda stage, seconds: None))
