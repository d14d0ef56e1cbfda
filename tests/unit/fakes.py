"""Fakes for the manager's orchestration tests: TAPs as a set, the guest's hops as gates, and a real
process (`sleep`) as the VMM, so exit watching and stopping are real. Shared by the manager's and
the API's unit tests; what they stand in for is tested for real in tests/integration.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from browservm.errors import BrowserVMError, HostNetworkError, ProbeFailed, VmmError
from browservm.guest.markers import format_marker
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.profiles.store import ProfileStore
from browservm.progress import BuildStep
from browservm.store import Store
from browservm.templates import DEFAULT, Template, Templates
from browservm.vm import hops
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import RFB
from browservm.vm.image_source import Images
from browservm.vm.manager import VMManager
from browservm.vm.parts import Deadlines, Limits
from browservm.vm.pool import PoolManager, WarmPool
from browservm.vm.readiness import Connection, GuestNetwork
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm import process
from browservm.vmm.accel import Accel
from browservm.vmm.placement import NoCgroup, Placement
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec


class FakeRulesetWatch:
    """The kernel's notifications of a changed ruleset, sent by the test (`notify`)."""

    def __init__(self) -> None:
        self.pending = 0
        self.closed = False
        self._notified: asyncio.Event | None = None

    def notify(self) -> None:
        self.pending += 1
        if self._notified is not None:
            self._notified.set()

    async def changed(self, timeout: float) -> bool:
        if not self.pending:
            self._notified = asyncio.Event()
            try:
                await asyncio.wait_for(self._notified.wait(), timeout)
            except TimeoutError:
                return False
        self.pending = 0
        return True

    def close(self) -> None:
        self.closed = True


class FakeNetwork:
    """TAPs as a set; `block` makes each call block its thread as a slow netlink round trip would. The
    service's drift watch and check: `watches`, `drift_checks`."""

    def __init__(self) -> None:
        self.netns = NetworkNamespace(None)
        self.taps: set[str] = set()
        self.leases: dict[str, Lease] = {}  # the lease each VM's TAP was added with
        self.calls: list[str] = []
        self.block = 0.0
        self.remove_fails = False
        self.watches: list[FakeRulesetWatch] = []
        self.drift_checks = 0

    def watch(self) -> FakeRulesetWatch:
        self.watches.append(FakeRulesetWatch())
        return self.watches[-1]

    def check_and_restore(self) -> list[object]:
        self.drift_checks += 1
        return []

    def add_tap(self, lease: Lease) -> None:
        time.sleep(self.block)
        self.calls.append(f"add {lease.vm_id}")
        self.taps.add(lease.vm_id)
        self.leases[lease.vm_id] = lease

    def remove_tap(self, vm_id: str) -> bool:
        time.sleep(self.block)
        if self.remove_fails:
            raise HostNetworkError("delete TAP", "Device or resource busy", device=f"tap-{vm_id}")
        self.calls.append(f"remove {vm_id}")
        present = vm_id in self.taps
        self.taps.discard(vm_id)
        return present

    def owned_taps(self) -> dict[str, str]:
        return {f"tap-{vm_id}": vm_id for vm_id in self.taps}

    def set_tap_up(self, tap: str, up: bool) -> None:
        self.calls.append(f"{'up' if up else 'down'} {tap}")


class SleepDriver:
    """Starts `sleep` as the VM's "VMM": a real process to watch, stop and find."""

    name = "fake"
    placement: Placement = NoCgroup("a fake driver's process: placement does not matter")
    holds_link = True
    reboot = "t"

    def __init__(self) -> None:
        self.block = 0.0
        self.fail_start = False
        self.booted: dict[str, Path] = {}
        self.started: dict[VmmProcess, str] = {}
        self.saved: list[str] = []
        self.restored: list[str] = []
        self.links_up: list[str] = []
        self.accel_name = "tcg"
        self.demoted: list[str] = []
        self.console_at_start = "[    0.9] Run /usr/lib/browservm/overlay-init as init process\n"
        self.stop_guest: asyncio.Event | None = None
        self.watch_fails = False

    def accel(self, kernel: Path) -> Accel:
        time.sleep(self.block)  # as the KVM probe boot would
        return Accel(self.accel_name, "the fake driver's")

    def demote_accel(self, kernel: Path, reason: str) -> bool:
        if self.accel_name != "kvm":
            return False
        self.accel_name = "tcg"
        self.demoted.append(reason)
        return True

    def accel_status(self) -> str:
        return f"{self.accel_name}: the fake driver's"

    async def wait_guest_stopped(self, spec: VmSpec) -> str:
        """Returns once the test sets `stop_guest`, an event it made on its loop (as QEMU's STOP event would
        come); never without one."""
        if self.watch_fails:
            raise VmmError(spec.vm_id, "watch the guest", "QEMU made no control socket within 10 s")
        if self.stop_guest is None:
            await asyncio.Future()
        assert self.stop_guest is not None
        await self.stop_guest.wait()
        self.stop_guest.clear()
        return "QEMU stopped running the guest (QMP event STOP, status 'internal-error')"

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        assert spec.overlay is not None and spec.overlay.exists()  # the disk exists before the VMM starts
        if self.fail_start:
            raise VmmError(spec.vm_id, "start", "cannot run fake-vmm: No such file or directory")
        time.sleep(self.block)
        # As a guest kernel would, before userspace: the manager's stall watch reads it. And the VMM's own log.
        spec.console_log.write_text(self.console_at_start)
        spec.vmm_log.write_text(f"fake-vmm: started {spec.vm_id}\n")
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        start_time = process.start_time(child.pid)
        assert start_time is not None
        vmm = VmmProcess(child.pid, start_time)
        self.started[vmm] = spec.vm_id
        self.booted[spec.vm_id] = spec.rootfs  # which image each VM booted (templates)
        return vmm

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        process.signal_process(vmm, signal.SIGKILL)
        assert process.wait_exit(vmm, timeout)

    def release(self, vm_id: str) -> None:
        pass

    def is_vmm_of(self, vmm: VmmProcess, directory: Path) -> bool:
        return self.started.get(vmm) == directory.name and process.alive(vmm)

    def running(self, vm_root: Path) -> dict[VmmProcess, str]:
        return {vmm: vm_id for vmm, vm_id in self.started.items() if process.alive(vmm)}

    def alive(self) -> list[VmmProcess]:
        return [vmm for vmm in self.started if process.alive(vmm)]

    # Snapshots: the state file holds the VM id it was taken of; a restore is a start that reads it.
    def snapshot_inputs(self, spec: VmSpec) -> dict[str, str]:
        return {"vmm": "sleep", "devices": f"{spec.vcpus}x{spec.mem_mib}"}

    def save(self, spec: VmSpec, target: Path) -> None:
        target.write_text(spec.vm_id)
        self.saved.append(spec.vm_id)

    def restore(self, spec: VmSpec, netns: NetworkNamespace, state: Path,
                before_resume: Callable[[], None]) -> VmmProcess:
        assert state.read_text() in self.saved
        vmm = self.start(spec, netns)
        before_resume()
        self.restored.append(spec.vm_id)
        return vmm

    def link_up(self, spec: VmSpec) -> None:
        self.links_up.append(spec.vm_id)


@dataclass
class FakeConnection:
    probes: FakeProbes

    async def upgrade(self) -> None:
        await self.probes.gate("ws.upgrade")

    async def banner(self) -> str:
        await self.probes.gate("rfb.banner")
        return "RFB 003.008"

    def close(self) -> None:
        self.probes.closed += 1


@dataclass
class FakeProbes:
    """Every hop passes at once, except those told to hang (until released) or fail."""

    ipam: Ipam
    hang: dict[str, asyncio.Event] = field(default_factory=dict)
    fail: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    reached: dict[str, asyncio.Event] = field(default_factory=dict)
    closed: int = 0
    listeners: tuple[str, ...] = ()  # what the manager last asked of desktop_ready and connect
    port: int = 0
    websocket: bool | None = None
    desktop: tuple[str, ...] = ()  # the parts the desktop says it started (a marker desktop_complete writes)
    screens: list[tuple[int, str]] = field(default_factory=list)  # browser_on_screen's port and password

    def hang_at(self, hop: str) -> asyncio.Event:
        self.hang[hop] = asyncio.Event()
        self.reached[hop] = asyncio.Event()
        return self.hang[hop]

    async def gate(self, hop: str) -> None:
        if hop in self.reached:
            self.reached[hop].set()
        if hop in self.hang:
            try:
                await self.hang[hop].wait()
            except asyncio.CancelledError:
                self.cancelled.append(hop)
                raise
        if hop in self.fail:
            raise ProbeFailed(hop, self.fail[hop])

    async def guest_network(self, console: ConsoleLog, timeout: float) -> GuestNetwork:
        await self.gate("guest.network")
        return GuestNetwork("configurator", "browservm-net: status=ok")

    async def arp(self, netns: NetworkNamespace, bridge: str, source: IPv4Address, target: IPv4Address,
                  timeout: float) -> str:
        await self.gate("net.arp")
        return next(lease.mac for lease in self.ipam.leases() if lease.address.ip == target)

    async def desktop_ready(self, console: ConsoleLog, timeout: float, listeners: tuple[str, ...]) -> None:
        self.listeners = listeners
        await self.gate("desktop.ready")

    async def desktop_complete(self, console: ConsoleLog, timeout: float) -> None:
        if self.desktop:
            with console.path.open("a") as log:
                log.write(format_marker("ready", service="desktop", state="ready", services=",".join(self.desktop))
                          + "\n")
        await self.gate("desktop.complete")

    async def browser_on_screen(self, netns: NetworkNamespace, address: IPv4Address, port: int, password: str,
                                timeout: float) -> None:
        self.screens.append((port, password))
        await self.gate("browser.screen")

    async def settled(self, vmm: VmmProcess, timeout: float) -> float:
        await self.gate("vm.settled")
        return 0.05

    async def connect(self, netns: NetworkNamespace, address: IPv4Address, port: int,
                      timeout: float, websocket: bool) -> Connection:
        self.port, self.websocket = port, websocket
        await self.gate("net.tcp")
        return FakeConnection(self)


@dataclass
class Parts:
    store: Store
    ipam: Ipam
    network: FakeNetwork
    driver: SleepDriver
    vm_root: Path
    images: Images
    # A build the first create waits for: its steps are told, then it waits for `build_done` (if set),
    # then fails with `build_error` (if set).
    build_steps: list[BuildStep] = field(default_factory=list)
    build_done: threading.Event | None = None
    build_error: BrowserVMError | None = None
    resolved: list[str] = field(default_factory=list)  # the templates whose images were resolved, in order

    def images_of(self, template: Template) -> Images:
        """The default template's images, or a rootfs of the template's own image (snapshots are keyed by it)."""
        if template.name == DEFAULT:
            return self.images
        rootfs = self.images.rootfs.with_name(f"rootfs-{template.image.replace('/', '_')}.ext4")
        if not rootfs.exists():
            rootfs.write_bytes(b"image " + template.image.encode())
        return Images(kernel=self.images.kernel, rootfs=rootfs, disk_template=self.images.disk_template)

    def manager(self, probes: FakeProbes | None = None, images_delay: float = 0.0,
                limits: Limits | None = None, desktop_path: str = RFB,
                deadlines: Deadlines | None = None,
                pool: Callable[[PoolManager], WarmPool | list[WarmPool]] | None = None,
                restore_by_default: bool = False, templates: Templates | None = None) -> VMManager:
        def images(template: Template, report: Callable[[BuildStep], None]) -> Images:
            time.sleep(images_delay)  # as resolving (or building) the kernel and image would
            for step in self.build_steps:
                report(step)
            if self.build_done is not None:
                assert self.build_done.wait(30), "the test never let the build end"
            if self.build_error is not None:
                raise self.build_error
            self.resolved.append(template.name)
            return self.images_of(template)
        return VMManager(records=VmRecords(self.store), ipam=self.ipam, network=self.network, driver=self.driver,
                         images=images, vm_root=self.vm_root, limits=limits or Limits(max_vms=4, max_vms_per_user=2),
                         deadlines=deadlines or Deadlines(stop=5), probes=probes or FakeProbes(self.ipam),
                         desktop_path=desktop_path, pool=pool, restore_by_default=restore_by_default,
                         templates=templates)

    def leftovers(self) -> dict[str, object]:
        return {"taps": self.network.taps, "leases": self.ipam.leases(), "vmms": self.driver.alive(),
                "directories": list(self.vm_root.iterdir()) if self.vm_root.exists() else []}


NOTHING: dict[str, object] = {"taps": set(), "leases": [], "vmms": [], "directories": []}



def make_parts(tmp_path: Path) -> Parts:
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0"))
    template = tmp_path / "template.ext4"
    template.write_bytes(b"\0" * 4096)
    images = Images(kernel=tmp_path / "vmlinux", rootfs=tmp_path / "rootfs.ext4", disk_template=template)
    for image in (images.kernel, images.rootfs):  # what a snapshot's key is made of
        image.write_bytes(b"image " + image.name.encode())
    return Parts(store, ipam, FakeNetwork(), SleepDriver(), tmp_path / "vms", images)


def stop_all(parts: Parts) -> None:
    for vmm in parts.driver.alive():
        process.signal_process(vmm, signal.SIGKILL)
    parts.store.close()


class FakeKeeper:
    """The guest's profile keeper as the manager sees it: what it was asked, in which state the VM was. With
    `store` (a served controller's own), a save keeps a stand-in for the guest's ciphertext there. No
    packet goes anywhere: the real keeper is reached only in a VM's network namespace."""

    def __init__(self, store: ProfileStore | None = None) -> None:
        self.store = store
        self.loaded: list[tuple[str, VmState, str]] = []
        self.saved: list[str] = []
        self.load_fails: str | None = None
        self.save_fails: str | None = None

    async def load(self, record: VmRecord) -> None:
        if self.load_fails:
            raise ProbeFailed(hops.PROFILE_LOAD, self.load_fails)
        if self.store is not None:  # as the real one: the user's key made, their profile read
            await asyncio.to_thread(self.store.key, record.tenant, record.user)
            await asyncio.to_thread(self.store.read, record.tenant, record.user)
        self.loaded.append((record.vm_id, record.state, record.user))

    async def save(self, record: VmRecord) -> None:
        if self.save_fails:
            raise ProbeFailed("profile.save", self.save_fails)
        self.saved.append(record.vm_id)
        if self.store is not None:
            await asyncio.to_thread(self.store.key, record.tenant, record.user)
            await asyncio.to_thread(self.store.write, record.tenant, record.user, f"sealed in {record.vm_id}".encode())
