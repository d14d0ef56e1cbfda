"""Readiness: from a running VMM to a VM whose desktop answers, hop by hop.

    guest.network  net.arp  desktop.ready  net.tcp  ws.upgrade  rfb.banner  desktop.complete

(ws.upgrade only on the websockify path: vm/desktop_path.py; the probes are vm/readiness.py's.)
Each hop has its own deadline and is raced against the VMM's exit, so a crashed VMM is reported
as such at once; a cold boot's hops are also raced against the guest stopping while its VMM lives
on (vm/stall.py). Every hop passed is written into the record (compare-and-set: a destroy meanwhile
ends the create there). Then the VM is marked ready, or its failure recorded: one way for a create
and for an adoption.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from functools import partial
from ipaddress import IPv4Address
from pathlib import Path
from typing import TypeVar

from browservm.errors import ProbeFailed
from browservm.faults import crash_point
from browservm.rfb import HandshakeFailed
from browservm.vm import config_disks, hops
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import PATHS, RFB, desktop_path
from browservm.vm.failures import Failures, reported_in_record
from browservm.vm.parts import ManagerParts, StageCallback
from browservm.vm.readiness import desktop_services
from browservm.vm.records import VmRecord
from browservm.vm.screen import ScreenError
from browservm.vm.stall import watch_guest
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import ExitWatch, race, uninterrupted
from browservm.vm.watcher import Watcher
from browservm.vmdir import VmDirectory
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec

T = TypeVar("T")


class BringUp:
    def __init__(self, parts: ManagerParts, failures: Failures, watcher: Watcher,
                 link_up: Callable[[VmRecord], Awaitable[None]]) -> None:
        self._parts = parts
        self._failures = failures
        self._watcher = watcher
        self._link_up = link_up  # a restored VM, once it has taken its own identity

    async def finish(self, record: VmRecord, work: Awaitable[None]) -> bool:
        """Run `work` (what brings the VM up), then mark the VM ready, tell so and watch it; or record
        why it failed and release it. False when it failed; what the record cannot explain propagates."""
        try:
            await work
            record.state = transition(record.vm_id, record.state, VmState.READY)
            record.owner = ""
            await uninterrupted(partial(self._parts.records.save, record))
        except BaseException as exc:
            await self._failures.fail(record, exc)
            if reported_in_record(exc):
                return False
            raise
        self._parts.notices.change(record, "ready")
        self._watcher.watch(record)
        return True

    async def passed(self, record: VmRecord, stage: str, report: StageCallback) -> None:
        """Record that `stage` passed (compare-and-set: a destroy meanwhile ends the create here)."""
        record.stages[stage] = round(time.time() - record.created_at, 3)
        await uninterrupted(partial(self._parts.records.save, record))
        report(stage, record.stages[stage])
        self._parts.notices.change(record, stage)
        crash_point(f"{stage}:done")

    async def readiness(self, record: VmRecord, report: StageCallback) -> None:
        """The readiness hops, in order, each within its deadline and raced against the VMM's exit."""
        assert record.pid is not None and record.pid_start_time is not None
        files = VmDirectory(Path(record.directory))
        console = ConsoleLog(files.console_log)
        parts = self._parts
        deadlines, probes, netns = parts.deadlines, parts.probes, parts.network.netns
        address = IPv4Address(record.address.split("/")[0])
        vmm = VmmProcess(record.pid, record.pid_start_time)
        exited = ExitWatch(vmm)
        # A cold boot is watched for a guest that stops while its VMM lives on (a KVM that cannot run
        # the kernel). Not a restored one: its VMM's control channel is needed to bring its link up.
        trouble = None if record.started_from != "cold" else asyncio.ensure_future(watch_guest(
            parts.driver.wait_guest_stopped(VmSpec.placeholder(record.vm_id, files.path)),
            files.console_log, vmm, deadlines.kernel_silence))

        async def hop(name: str, work: Awaitable[T], timeout: float) -> T:
            crash_point(f"{name}:during")
            try:
                result = await race(name, work, timeout, exited.future, trouble)
            except TimeoutError:
                raise ProbeFailed(name, f"not done within {timeout:g} s") from None
            await self.passed(record, name, report)
            return result

        try:
            network = await hop(hops.GUEST_NETWORK, probes.guest_network(console, deadlines.guest_network),
                                deadlines.guest_network + 1)
            record.guest_network_by = network.by
            if record.started_from != "cold":  # it has taken its own identity: connect it
                await self._link_up(record)
            mac = await hop(hops.NET_ARP, probes.arp(netns, record.bridge, IPv4Address(record.gateway), address,
                                                     deadlines.arp), deadlines.arp + 1)
            if mac != record.mac:
                raise ProbeFailed(hops.NET_ARP, f"{address} answered from {mac}, not from this VM's MAC "
                                                f"{record.mac}: another machine holds the address")
            path = desktop_path(record.desktop_path)
            await hop(hops.DESKTOP_READY, probes.desktop_ready(console, deadlines.desktop, path.listeners),
                      deadlines.desktop)
            connection = await hop(hops.NET_TCP, probes.connect(netns, address, path.port, deadlines.tcp,
                                                                path.websocket), deadlines.tcp + 1)
            try:
                if path.websocket:
                    await hop(hops.WS_UPGRADE, connection.upgrade(), deadlines.websocket)
                await hop(hops.RFB_BANNER, connection.banner(), deadlines.rfb)
            finally:
                connection.close()
            await hop(hops.DESKTOP_COMPLETE, self._desktop_complete(record, console), deadlines.desktop)
        finally:
            exited.close()
            if trouble is not None:
                trouble.cancel()
                with contextlib.suppress(asyncio.CancelledError, ProbeFailed):
                    await trouble

    async def _desktop_complete(self, record: VmRecord, console: ConsoleLog) -> None:
        """Every part of the desktop up, and on a cold boot its browser painted (judged by its pixels):
        Chromium says it runs some 13 s (under emulation) before its window is drawn, and a person
        sent to the desktop then would look at an empty screen. A restored VM was saved painted."""
        await self._parts.probes.desktop_complete(console, self._parts.deadlines.desktop)
        if record.started_from == "cold":
            await self.browser_painted(record)

    async def browser_painted(self, record: VmRecord, hop: str = hops.DESKTOP_COMPLETE) -> None:
        """Wait until the browser is on the VM's screen, judged by its pixels, when its desktop has one (also
        after Chromium started again with a user's profile: `hop` profile.load).

        Watched over the rfb path's port whatever the VM's desktop path: x11vnc listens on the
        guest's address whenever it has a password, and every VM has one. The watcher hangs up and
        waits until x11vnc let it go: a snapshot taken with x11vnc still counting a viewer would wake
        in every clone sending frames to a gone address.
        """
        files = VmDirectory(Path(record.directory))
        lines = await asyncio.to_thread(ConsoleLog(files.console_log).tail, 5000)
        if "chromium" not in desktop_services(lines):
            return
        secrets = await asyncio.to_thread(config_disks.read_secrets, files.config_disk, record.vm_id)
        password = secrets.get("vnc")
        if password is None:
            raise ProbeFailed(hop, "the VM's config disk has no VNC password to watch its screen with")
        timeout = self._parts.deadlines.screen
        try:
            await self._parts.probes.browser_on_screen(self._parts.network.netns,
                                                       IPv4Address(record.address.split("/")[0]),
                                                       PATHS[RFB].port, password, timeout)
        except (ProbeFailed, TimeoutError, ScreenError, HandshakeFailed, OSError) as exc:
            load = os.getloadavg()[0]
            raise ProbeFailed(
                hop, f"Chromium runs but its window never showed within {timeout:g} s: "
                                       f"{exc or type(exc).__name__} (the host's load: {load:.1f} on {os.cpu_count()} "
                                       "CPUs)",
                "Chromium started but never painted its window as a browser's (the reason says what the screen "
                "showed); if the host's load is far above its CPUs, other guests starved this one: fewer VMs at "
                "once, or more CPUs") from exc
