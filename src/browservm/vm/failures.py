"""A VM's failure, recorded one way whoever finds it (a create, the watcher, a reconcile).

The record says which hop, why, what the console and the VMM's own log showed last (copied
before the VM's directory goes), and what probably to do about it; then the VM is released
unless kept for diagnosis. Every write is a compare-and-set: on a conflict the record belongs to
whoever changed it, and this writer only undoes what it made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from functools import partial
from pathlib import Path

from browservm.errors import BrowserVMError, ProbeFailed, StateConflict, VmmError
from browservm.vm import hops
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import desktop_path
from browservm.vm.parts import ManagerParts
from browservm.vm.records import Failure, VmRecord
from browservm.vm.release import Release
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import VmmExited, uninterrupted
from browservm.vmdir import VmDirectory
from browservm.vmm.qemu import without_dumps

_CONSOLE_EVIDENCE = 20
_VMM_LOG_EVIDENCE = 20
_VMM_LOG_READ = 64 * 1024  # of the VMM's log's end: what its last lines need (a guest cannot write there)


class Failures:
    def __init__(self, parts: ManagerParts, release: Release) -> None:
        self._parts = parts
        self._release = release

    async def fail(self, record: VmRecord, exc: BaseException) -> None:
        """Record why a create (or an adoption) failed, then release the VM unless kept. Runs to its end
        even if cancelled."""
        if isinstance(exc, StateConflict):
            # Someone else changed the record (a destroy): they own it now; only undo what this create made.
            await uninterrupted(partial(self._release.release, record))
            return
        hop, reason = hop_and_reason(exc, next_stage(record))
        hint = exc.hint if isinstance(exc, ProbeFailed) and exc.hint else hops.hint(hop)
        await self.record(record, hop, reason, hint)

    async def record(self, record: VmRecord, hop: str, reason: str, hint: str) -> None:
        """Mark the VM failed at `hop`, with what its console and VMM's log showed last, taken over by
        this process; save it, then release it unless kept (StateConflict: changed meanwhile)."""
        console, vmm_log = await uninterrupted(partial(evidence, record))
        record.failure = Failure(hop=hop, reason=reason, hint=hint, evidence=console, vmm_log=vmm_log)
        record.failed_at = time.time()
        record.state = transition(record.vm_id, record.state, VmState.FAILED)
        record.owner = self._parts.me
        await self.settle(record)

    async def settle(self, record: VmRecord) -> None:
        """Save a failed record, then release its resources unless kept.

        On a conflict the record belongs to whoever changed it: this writer only releases what it
        made, and the StateConflict goes on to its caller.
        """
        records = self._parts.records
        try:
            await uninterrupted(partial(records.save, record))
            self._parts.notices.change(record, "failed")
            if record.keep:
                return
            errors = await uninterrupted(partial(self._release.release, record))
            if errors:
                assert record.failure is not None
                record.failure = dataclasses.replace(record.failure, cleanup=tuple(errors))
            else:
                record.holds_resources = False
                record.pid = record.pid_start_time = None
            record.owner = ""
            await uninterrupted(partial(records.save, record))
        except StateConflict:
            await uninterrupted(partial(self._release.release, record))
            raise


def evidence(record: VmRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The console's last lines and the VMM's log's (its stderr: QEMU's own words). Blocking."""
    files = VmDirectory(Path(record.directory))
    return (tuple(ConsoleLog(files.console_log).tail(_CONSOLE_EVIDENCE)),
            tuple(_tail(files.vmm_log, _VMM_LOG_EVIDENCE)))


def reported_in_record(exc: BaseException) -> bool:
    """A failure the record explains (a hop, an OS error); anything else also propagates."""
    return isinstance(exc, (BrowserVMError, OSError, VmmExited)) and not isinstance(exc, StateConflict)


def next_stage(record: VmRecord) -> str:
    """The first hop the record has not passed: where its creator was when it stopped."""
    names = desktop_path(record.desktop_path).names
    return next((name for name in names if name not in record.stages), names[-1])


def hop_and_reason(exc: BaseException, stage: str) -> tuple[str, str]:
    if isinstance(exc, ProbeFailed):
        return exc.hop, exc.reason
    if isinstance(exc, VmmExited):
        return hops.VMM_EXITED, str(exc)
    if isinstance(exc, VmmError):
        return stage, exc.reason
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return stage, f"{exc.strerror or exc}{where}"
    if isinstance(exc, asyncio.CancelledError):
        return hops.CONTROLLER, f"cancelled during {stage}"
    if isinstance(exc, BrowserVMError):
        return stage, str(exc)
    return stage, f"{type(exc).__name__}: {exc}"


def _tail(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log the VMM writes (bounded: only its last 64 KiB are read)."""
    try:
        with path.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, os.SEEK_END) - _VMM_LOG_READ))
            data = stream.read(_VMM_LOG_READ)
    except FileNotFoundError:
        return []
    return [line[:1000] for line in without_dumps(data.decode(errors="replace").splitlines())][-count:]
