"""What every part of the VM manager works with, made once by VMManager and handed to each.

The host's pieces (records, addresses, network, VMM driver, VM root), the deadlines and probes,
this process's identity as a record `owner`, whom to tell of a VM's news, and the tasks the
manager owns (`close` cancels them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.vm.readiness import Probes
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.waiting import wait_out
from browservm.vmdir import VmDirectory
from browservm.vmm import process
from browservm.vmm.driver import VmmDriver
from browservm.vmm.process import VmmProcess

T = TypeVar("T")

StageCallback = Callable[[str, float], None]


@dataclass(frozen=True)
class Deadlines:
    """Seconds each hop may take. Generous: under software emulation a desktop takes a minute to come up."""

    guest_network: float = 180.0
    # A cold boot's console silent this long before userspace: the guest stopped (guest.stalled). A
    # kernel booting under emulation on a loaded host pauses for a few seconds at most.
    kernel_silence: float = 15.0
    arp: float = 30.0
    desktop: float = 600.0
    tcp: float = 10.0
    websocket: float = 180.0
    rfb: float = 60.0
    # A cold boot's desktop.complete: Chromium running -> its window painted, within the hop's own
    # `desktop` deadline. As long: on a host loaded with other guests Chromium took minutes to paint
    # (a newcomer's first VM beside a test run of nine guests: 8 frames in 180 s, not yet painted).
    screen: float = 600.0
    settle: float = 90.0  # a snapshot's VM: the browser painted -> the guest idle
    stop: float = 10.0


@dataclass(frozen=True)
class Limits:
    max_vms: int = 32
    max_vms_per_user: int = 4
    vcpus: tuple[int, int] = (1, 8)
    mem_mib: tuple[int, int] = (256, 16384)


class VmNetwork(Protocol):
    """What the manager needs of the host network (HostNetwork is the real one). Blocking."""

    netns: NetworkNamespace

    def add_tap(self, lease: Lease) -> None: ...

    def remove_tap(self, vm_id: str) -> bool: ...

    def set_tap_up(self, tap: str, up: bool) -> None: ...

    def owned_taps(self) -> dict[str, str]: ...


def this_process() -> str:
    """This process's identity as a record `owner`: PID and start time, so a reused PID never matches."""
    return f"{os.getpid()}:{process.start_time(os.getpid())}"


def owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return bool(pid and start.isdigit()) and process.alive(VmmProcess(int(pid), int(start)))


@dataclass
class Notices:
    """Whom the manager tells of a VM's news. Each is optional."""

    # Every change: a stage passed (its name), "ready", "failed", "ended" or "destroyed".
    on_change: Callable[[VmRecord, str], None] | None = None
    # What a create waits through, in words: "build" (a step of the kernel's or image's build) and
    # "retry" (the create tried again under TCG, and why).
    on_note: Callable[[VmRecord, str, str], None] | None = None
    on_failure: Callable[[VmRecord], None] | None = None  # a dead VM marked and released
    # The warm pool's, told first: a pooled VM that failed or went is replaced.
    pool_notice: Callable[[VmRecord, str], None] | None = None

    def change(self, record: VmRecord, event: str) -> None:
        for listener in (self.pool_notice, self.on_change):
            if listener is not None:
                listener(record, event)

    def note(self, record: VmRecord, kind: str, detail: str) -> None:
        if self.on_note is not None:
            self.on_note(record, kind, detail)

    def failure(self, record: VmRecord) -> None:
        if self.on_failure is not None:
            self.on_failure(record)


class ProfileLink(Protocol):
    """A user's browser profile into a VM and out of it (profiles/keeper.py); ProbeFailed names the hop."""

    async def load(self, record: VmRecord) -> None: ...

    async def save(self, record: VmRecord) -> None: ...


@dataclass
class ManagerParts:
    records: VmRecords
    ipam: Ipam
    network: VmNetwork
    driver: VmmDriver
    vm_root: Path
    limits: Limits
    deadlines: Deadlines
    probes: Probes
    notices: Notices
    profiles: ProfileLink | None = None  # None: this controller keeps no browser profiles
    me: str = field(default_factory=this_process)  # tests stand in for another process by changing it
    _tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def directory(self, vm_id: str) -> VmDirectory:
        return VmDirectory.under(self.vm_root, vm_id)

    def own(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """Start a task the manager owns: `close` cancels it."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_tasks(self) -> None:
        """Cancel every task of the manager and wait for each to finish its cleanup."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await wait_out(task)
