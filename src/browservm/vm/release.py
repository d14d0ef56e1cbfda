"""Release: the one way a VM's resources go.

A failure, a cancellation, a destroy and a reconcile all release a VM the same way: stop its
VMM, then remove its placement, TAP, lease and directory, each only if still there (every create
step writes what it made into the record before it returns, so its undo is found here). A release
that fails keeps the record counting against limits, with the errors.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path

from browservm.errors import BrowserVMError, CleanupFailed, StateConflict
from browservm.faults import crash_point
from browservm.vm.parts import ManagerParts
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import uninterrupted
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec

# Each undo, in the order a release runs them (a create step names the one that undoes it).
UNDO_VMM, UNDO_PLACEMENT, UNDO_TAP, UNDO_LEASE, UNDO_DIRECTORY = "vmm", "vmm placement", "tap", "lease", "directory"


class Release:
    def __init__(self, parts: ManagerParts) -> None:
        self._parts = parts

    def release(self, record: VmRecord) -> list[str]:
        """Stop the VMM, then remove its placement, TAP, lease and directory, each only if still there.

        Blocking. Tries every resource even when one fails; returns one line per failure.
        """
        errors: list[str] = []
        for what, work in self._undos(record):
            try:
                work()
            except (BrowserVMError, OSError) as exc:
                errors.append(f"{what}: {exc}")
            crash_point(f"release.{what.replace(' ', '-')}:done")
        return errors

    def _undos(self, record: VmRecord) -> list[tuple[str, Callable[[], object]]]:
        parts, directory = self._parts, Path(record.directory)
        undos: list[tuple[str, Callable[[], object]]] = [
            (UNDO_VMM, partial(self.stop_vmm, record)),
            (UNDO_PLACEMENT, partial(parts.driver.release, record.vm_id)),
            (UNDO_TAP, partial(parts.network.remove_tap, record.vm_id)),
            (UNDO_LEASE, partial(parts.ipam.release, record.vm_id))]
        if directory.parent == parts.vm_root:  # never a directory the record names elsewhere
            undos.append((UNDO_DIRECTORY, partial(remove_tree, directory)))
        return undos

    def stop_vmm(self, record: VmRecord) -> None:
        parts, directory = self._parts, Path(record.directory)
        if record.pid is not None and record.pid_start_time is not None:
            found = [VmmProcess(record.pid, record.pid_start_time)]
        else:  # a crash between spawning the VMM and recording it: find it by its identity
            found = [vmm for vmm, vm_id in parts.driver.running(parts.vm_root).items() if vm_id == record.vm_id]
        for vmm in found:
            if parts.driver.is_vmm_of(vmm, directory):
                # Stopping needs only the VM's directory (its control socket), not its images.
                parts.driver.stop(VmSpec.placeholder(record.vm_id, directory), vmm, parts.deadlines.stop)

    def stop_orphan(self, vmm: VmmProcess, vm_id: str) -> None:
        """A VMM of our VM root whose VM no record holds. Blocking."""
        parts = self._parts
        parts.driver.stop(VmSpec.placeholder(vm_id, parts.directory(vm_id).path), vmm, parts.deadlines.stop)
        parts.driver.release(vm_id)

    async def finish_destroy(self, record: VmRecord) -> None:
        """Release a VM marked destroying, then end its record (`ended_reason`) or delete it."""
        errors = await uninterrupted(partial(self.release, record))
        if errors:
            raise CleanupFailed(record.vm_id, errors)
        records, notices = self._parts.records, self._parts.notices
        with contextlib.suppress(StateConflict):  # another destroy finished first
            if record.ended_reason:
                record.state = transition(record.vm_id, record.state, VmState.ENDED)
                record.holds_resources = False
                record.pid = record.pid_start_time = None
                record.owner = ""
                await uninterrupted(partial(records.save, record))
                notices.change(record, "ended")
            else:
                await uninterrupted(partial(records.delete, record))
                notices.change(record, "destroyed")


def remove_tree(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)
