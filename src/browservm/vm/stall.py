"""Telling a guest that stopped from one that is slow, while a cold-booted VM comes up.

Two signs, each awaited rather than sampled:

- the VMM says it stopped running the guest (QEMU's STOP event: a KVM internal error pauses the
  guest and QEMU lives on, so no exit watch notices): `vmm.stopped`, at once, in QEMU's words;
- the guest's console goes silent before userspace for longer than a kernel ever pauses while it
  boots (a vCPU spinning under a /dev/kvm that cannot run it prints nothing more, and QEMU calls
  it running): `guest.stalled`, with the last kernel line, how long ago, and how busy the VMM was.

After userspace a quiet console is normal (services start without printing), so silence then
proves nothing and only the VMM's own word counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import NoReturn

from browservm.errors import ProbeFailed, VmmError
from browservm.vm.console import ConsoleLog
from browservm.vm.hops import GUEST_STALLED, VMM_STOPPED
from browservm.vmm.process import VmmProcess, cpu_seconds

# The kernel handing over to init, or any of our guest's own markers: userspace runs.
USERSPACE = re.compile(r"Run \S+ as init process|browservm-[a-z]+: ")


def reached_userspace(lines: list[str]) -> bool:
    return any(USERSPACE.search(line) for line in lines)


def _last(lines: list[str]) -> str:
    return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]


async def watch_guest(stopped: Awaitable[str], console: Path, vmm: VmmProcess, silence: float) -> NoReturn:
    """Raise ProbeFailed(vmm.stopped or guest.stalled) when the guest stops; never returns otherwise.

    `stopped` is the VMM's own watch (VmmDriver.wait_guest_stopped). Meant to be raced against the
    readiness hops and cancelled when they end.
    """
    log = ConsoleLog(console)
    vmm_stop = asyncio.ensure_future(stopped)
    quiet = asyncio.ensure_future(_silent_before_userspace(log, vmm, silence))
    try:
        done, _ = await asyncio.wait({vmm_stop, quiet}, return_when=asyncio.FIRST_COMPLETED)
        if quiet in done:
            quiet.result()  # raises guest.stalled; returns once userspace runs
        try:
            words = await vmm_stop
        except VmmError:
            await quiet  # the VMM cannot be watched: its console still can, then its exit and the deadlines
            await asyncio.Future()
            raise AssertionError("unreachable") from None
        lines = await asyncio.to_thread(log.tail, 5)
        raise ProbeFailed(VMM_STOPPED, f"{words}; the console's last line: {_last(lines)!r}")
    finally:
        for task in (vmm_stop, quiet):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, VmmError, ProbeFailed):
                await task


async def _silent_before_userspace(log: ConsoleLog, vmm: VmmProcess, silence: float) -> None:
    """Return once the guest reaches userspace; ProbeFailed(guest.stalled) after `silence` seconds
    without a console line before that."""
    cpu_before, since = await asyncio.to_thread(cpu_seconds, vmm), time.monotonic()
    while True:
        new = await log.wait_new(silence)
        if reached_userspace(new):
            return
        if new:
            cpu_before, since = await asyncio.to_thread(cpu_seconds, vmm), time.monotonic()
            continue
        cpu_after, quiet_for = await asyncio.to_thread(cpu_seconds, vmm), time.monotonic() - since
        if cpu_after is None:
            return  # the VMM is gone: its exit watch reports that
        busy = "" if cpu_before is None else f", using {(cpu_after - cpu_before) / quiet_for:.0%} of a CPU meanwhile"
        last = _last(list(log.lines))
        said = f"its last line was {last!r}" if last else "it never printed a line"
        raise ProbeFailed(GUEST_STALLED, f"the guest's console went silent before userspace: {said}, "
                                         f"{quiet_for:.0f} s ago; its VMM (PID {vmm.pid}) still runs{busy}")
