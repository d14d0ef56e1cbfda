"""VMManager: creates, finds, watches and destroys browser VMs. No OS calls of its own.

Creating a VM is the list of hops in hops.py, run in order:

    net.lease  net.tap  disk.clone  vmm.spawn                                  resources
    guest.network  net.arp  desktop.ready  net.tcp  ws.upgrade  rfb.banner     readiness
    desktop.complete                                                           the browser on screen

(ws.upgrade only on the websockify path: vm/desktop_path.py)

Before the first of them the kernel and golden image are resolved (built, the first time on a new
host: minutes, each step told to whoever waits as a `build` event), inside the create's own task,
so a request is answered at once.

Built to live inside a long-running server that serves many requests at once:

- Nothing blocks the event loop. Every blocking step (SQLite, netlink, files, spawning, the KVM
  probe, image resolution) runs in a thread, and runs to its end even when the create is
  cancelled, so what it made is known and undone.
- One release path. A failure, a cancellation, a destroy and a reconcile all release a VM the
  same way (`_release`): stop its VMM, its placement, TAP, lease and directory, each only if
  still there. A release that fails keeps the record counting against limits, with the errors.
- Every record write is a compare-and-set (records.py), and a record names the live process
  working on it (`owner`), so a reconcile never frees what another process is still creating,
  and a late `ready` never overwrites `failed` or a destroy.
- Every task the manager starts is its own (`close` cancels them all).

Each readiness hop has its own deadline and is raced against the VMM's exit, so a crashed VMM
is reported as such at once; a cold boot's hops are also raced against the guest stopping while
its VMM lives on (vm/stall.py): a KVM that cannot run the kernel is named within seconds, and under
`--accel auto` the create is tried once more under TCG. A VM that fails keeps a record that says
which hop, why, what the console and the VMM's own log showed last, and what probably to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import shutil
import string
import time
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Protocol, TypeVar

from browservm.errors import BrowserVMError, CleanupFailed, InvalidInput, ProbeFailed, StateConflict, VmmError
from browservm.faults import crash_point
from browservm.guest import configdisk
from browservm.guest.bootargs import BootArgs, IpConfig, build_boot_args
from browservm.hostnet.netns import NetworkNamespace
from browservm.ids import new_vm_id, validate_vm_id
from browservm.images.disk import clone_sparse
from browservm.ipam import Ipam, Lease
from browservm.progress import BuildStep
from browservm.rfb import HandshakeFailed
from browservm.vm import hops
from browservm.vm.console import MAX_DISK, ConsoleLog, cap_console
from browservm.vm.desktop_path import PATHS, RFB
from browservm.vm.desktop_path import desktop_path as desktop_path_named
from browservm.vm.pool import POOL_USER, WarmPool
from browservm.vm.readiness import GuestProbes, Probes, desktop_services
from browservm.vm.records import Failure, Purpose, VmRecord, VmRecords
from browservm.vm.screen import ScreenError
from browservm.vm.snapshots import Snapshot, Snapshots
from browservm.vm.stall import watch_guest
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import ExitWatch, VmmExited, race, uninterrupted, wait_out
from browservm.vmm import process
from browservm.vmm.driver import VmmDriver
from browservm.vmm.process import VmmProcess
from browservm.vmm.qemu import without_dumps
from browservm.vmm.spec import VmSpec

T = TypeVar("T")
log = logging.getLogger(__name__)
CONFIG_DISK = "config.img"
# Extra kernel arguments a request may add: ones that tune, never ones that choose what runs.
EXTRA_BOOT_ARGS = frozenset({"loglevel", "printk.time", "random.trust_cpu", "clocksource", "tsc",
                             "no_timer_check", "mitigations", "systemd.show_status"})


def new_secrets() -> dict[str, str]:
    """Per-VM secrets, made at its start and carried to the guest on its config disk only."""
    # VNC passwords: 8 characters (all RFB's DES key holds), letters and digits only, which x11vnc's
    # password file reads literally.
    vnc = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))
    return {"agent": secrets.token_hex(32), "vnc": vnc}


SNAPSHOT_USER = "browservm-snapshot"  # whose VM a snapshot is made of
# What no request may name its user (compared after normalise_user): the controller's own VMs'.
RESERVED_USERS: dict[Purpose, str] = {"pool": POOL_USER, "snapshot": SNAPSHOT_USER}
_CONSOLE_EVIDENCE = 20
_VMM_LOG_EVIDENCE = 20
_VMM_LOG_READ = 64 * 1024  # of the VMM's log's end: what its last lines need (a guest cannot write there)
_LIVE = (VmState.CREATING, VmState.BOOTING, VmState.READY)


@dataclass(frozen=True)
class Images:
    kernel: Path
    rootfs: Path
    disk_template: Path


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
    screen: float = 180.0  # a cold boot's desktop.complete: Chromium running -> its window painted
    settle: float = 90.0  # a snapshot's VM: the browser painted -> the guest idle
    stop: float = 10.0


@dataclass(frozen=True)
class Limits:
    max_vms: int = 32
    max_vms_per_user: int = 4
    vcpus: tuple[int, int] = (1, 8)
    mem_mib: tuple[int, int] = (256, 16384)


StageCallback = Callable[[str, float], None]


class VmNetwork(Protocol):
    """What the manager needs of the host network (HostNetwork is the real one). Blocking."""

    netns: NetworkNamespace

    def add_tap(self, lease: Lease) -> None: ...

    def remove_tap(self, vm_id: str) -> bool: ...

    def set_tap_up(self, tap: str, up: bool) -> None: ...

    def owned_taps(self) -> dict[str, str]: ...


def vm_uid(base: int, address: str) -> int:
    """The uid (and gid) a VM's VMM runs as: one per VM, from its address's low 24 bits.

    VM addresses are unique and all in one private subnet (at most 10.0.0.0/8, 24 bits of host),
    so no two live VMs share a uid, and a uid means the same VM for as long as it lives.
    """
    return base + (int(IPv4Interface(address).ip) & 0xFFFFFF)


def normalise_user(user: str) -> str:
    """One spelling per person: NFKC, case-folded, without surrounding spaces, so "Ann", " ann " and
    the same letters in full width share one per-user limit."""
    return unicodedata.normalize("NFKC", user).strip().casefold()


def this_process() -> str:
    """This process's identity as a record `owner`: PID and start time, so a reused PID never matches."""
    return f"{os.getpid()}:{process.start_time(os.getpid())}"


def owner_alive(owner: str) -> bool:
    pid, _, start = owner.partition(":")
    return bool(pid and start.isdigit()) and process.alive(VmmProcess(int(pid), int(start)))


class VMManager:
    def __init__(self, *, records: VmRecords, ipam: Ipam, network: VmNetwork, driver: VmmDriver,
                 images: Callable[[Callable[[BuildStep], None]], Images], vm_root: Path,
                 limits: Limits | None = None,
                 deadlines: Deadlines | None = None, probes: Probes | None = None,
                 vm_uid_base: int | None = None, snapshots: Snapshots | None = None,
                 desktop_path: str = RFB) -> None:
        self._records = records
        self._ipam = ipam
        self._network = network
        self._driver = driver
        # Resolved on the first create: it may build a kernel and an image, telling each step.
        self._images_source = images
        self._images: Images | None = None
        self._images_lock = asyncio.Lock()
        self.building: BuildStep | None = None  # the build step under way, while creates wait for it
        self._awaiting_images: dict[str, VmRecord] = {}
        self._vm_root = vm_root
        self._limits = limits or Limits()
        self._deadlines = deadlines or Deadlines()
        self._probes = probes or GuestProbes()
        self._vm_uid_base = vm_uid_base  # None: VMMs run as the controller's user
        self.desktop_path = desktop_path_named(desktop_path)  # new VMs' records keep it
        self.snapshots = snapshots or Snapshots(vm_root.parent / "snapshots")
        self._snapshot_lock = asyncio.Lock()  # one snapshot made at a time
        self.restore_by_default = False  # start(): restore from a snapshot unless told otherwise
        self.pool: WarmPool | None = None  # where start() takes a ready VM from first
        self._me = this_process()
        self._tasks: set[asyncio.Task[object]] = set()
        self._creating: dict[str, asyncio.Task[VmRecord]] = {}
        self._watched: dict[str, ExitWatch] = {}
        self.on_failure: Callable[[VmRecord], None] | None = None  # told once a dead VM is marked and released
        # Told of every change: a stage passed (its name), "ready", "failed", "ended" or "destroyed".
        self.on_change: Callable[[VmRecord, str], None] | None = None
        # Told what a create waits through, in words: "build" (a step of the kernel's or image's build)
        # and "retry" (the create tried again under TCG, and why).
        self.on_note: Callable[[VmRecord, str, str], None] | None = None

    @property
    def driver(self) -> VmmDriver:
        return self._driver

    def _notify(self, record: VmRecord, event: str) -> None:
        if self.on_change is not None:
            self.on_change(record, event)

    def _note(self, record: VmRecord, kind: str, detail: str) -> None:
        if self.on_note is not None:
            self.on_note(record, kind, detail)

    def _own(self, work: Awaitable[T]) -> asyncio.Task[T]:
        """Start a task the manager owns: `close` cancels it."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel every task of the manager and wait for each to finish its cleanup; stop watching."""
        for watch in self._watched.values():
            watch.close()
        self._watched.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await wait_out(task)

    # --- create --------------------------------------------------------------------------

    async def create(self, user: str = "default", vcpus: int = 1, mem_mib: int = 1024, *,
                     keep_failed: bool = False, extra_boot_args: tuple[str, ...] = (),
                     on_stage: StageCallback | None = None, restore: bool | None = None,
                     purpose: Purpose = "user") -> VmRecord:
        """Boot a VM and return once its desktop answers, or its record says which hop failed."""
        _, task = await self.start(user, vcpus, mem_mib, keep_failed=keep_failed, extra_boot_args=extra_boot_args,
                                   on_stage=on_stage, restore=restore, purpose=purpose)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # the caller is gone: so is the VM, released as for a failure
            await wait_out(task)
            raise

    async def start(self, user: str = "default", vcpus: int = 1, mem_mib: int = 1024, *,
                    keep_failed: bool = False, extra_boot_args: tuple[str, ...] = (),
                    on_stage: StageCallback | None = None, restore: bool | None = None,
                    purpose: Purpose = "user") -> tuple[VmRecord, asyncio.Task[VmRecord]]:
        """Check the request, write the VM's record, and boot it in a task of the manager's own.

        A ready VM from the warm pool comes first, when there is one (its task is already done).
        With `restore` (default: `restore_by_default`) the VM starts from the snapshot of its inputs;
        without one it boots cold while the snapshot is made in the background. Returns at once with
        the record (state `creating`) and the task that ends with the final one; the kernel and image
        are resolved (built, on a new host) in that task.
        `purpose` says whose VM it is: a user's (named by `user`), or the warm pool's or the snapshot
        maker's (under their reserved names, which no request may use); no request reaches it.
        """
        self.check_request(user, vcpus, mem_mib, extra_boot_args, reserved_ok=purpose != "user")
        user = normalise_user(user) if purpose == "user" else RESERVED_USERS[purpose]
        plain = not extra_boot_args and not keep_failed
        ours = purpose != "user"  # the pool's own VMs and the one a snapshot is made of
        if self.pool is not None and not ours and plain and self.pool.fits(vcpus, mem_mib):
            claimed = await self.pool.claim(user)
            if claimed is not None:
                self._notify(claimed, "ready")
                return claimed, self._own(_already(claimed))
        restore = self.restore_by_default if restore is None else restore
        vm_id = new_vm_id()
        record = VmRecord(vm_id=vm_id, user=user, vcpus=vcpus, mem_mib=mem_mib, keep=keep_failed,
                          directory=str(self._vm_root / vm_id), driver=self._driver.name, owner=self._me,
                          desktop_path=self.desktop_path.name, in_pool=purpose == "pool")
        restore = restore and plain
        if restore and self._images is not None:  # decided now, so that the answer says how it starts
            await self._use_snapshot(record)
            restore = False
        # The pool holds as many VMs as its settings say, whatever the limit of one person.
        per_user = self._limits.max_vms if record.in_pool else self._limits.max_vms_per_user
        await uninterrupted(partial(self._records.insert, record, max_total=self._limits.max_vms,
                                    max_per_user=per_user))
        crash_point("record:done")
        task = self._own(self._create(dataclasses.replace(record), extra_boot_args, restore,
                                      on_stage or (lambda stage, seconds: None)))
        self._creating[vm_id] = task
        task.add_done_callback(lambda _: self._creating.pop(vm_id, None))
        return record, task

    def check_request(self, user: str, vcpus: int, mem_mib: int, extra_boot_args: tuple[str, ...] = (), *,
                      reserved_ok: bool = False) -> None:
        """Refuse bad input (InvalidInput naming the field) before anything is allocated."""
        if not isinstance(user, str) or not 1 <= len(normalise_user(user)) <= 64 or not user.isprintable():
            raise InvalidInput("user", user, "must be 1-64 printable characters")
        if not reserved_ok and normalise_user(user) in RESERVED_USERS.values():
            raise InvalidInput("user", user, "is reserved for the controller's own VMs (the warm pool's, "
                                             "the snapshot maker's)")
        for field, value, (low, high), unit in (("vcpus", vcpus, self._limits.vcpus, ""),
                                                ("mem_mib", mem_mib, self._limits.mem_mib, " MiB")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(field, value, "must be a whole number")
            if not low <= value <= high:
                raise InvalidInput(field, value, f"must be between {low} and {high}{unit}")
        build_boot_args(BootArgs(ip=None, extra=extra_boot_args))
        for word in extra_boot_args:
            key = word.partition("=")[0]
            if not (key in EXTRA_BOOT_ARGS or key.startswith("browservm.")):
                raise InvalidInput("extra", word, "not an allowed extra kernel argument (allowed: browservm.*, "
                                                  f"{', '.join(sorted(EXTRA_BOOT_ARGS))}): the rest could change "
                                                  "what boots (init=, root=, rw, --, a debug shell) or hide it")

    async def _resolve_images(self) -> Images:
        async with self._images_lock:
            if self._images is None:
                loop = asyncio.get_running_loop()

                def report(step: BuildStep) -> None:  # in the build's thread: told on the event loop
                    loop.call_soon_threadsafe(self._build_step, step)
                try:
                    self._images = await uninterrupted(partial(self._images_source, report))
                finally:
                    self.building = None
            images: Images = self._images
            return images

    def _build_step(self, step: BuildStep) -> None:
        """A step of the kernel's or image's build: told to every create waiting for them."""
        self.building = None if step.name == "done" else step
        for record in list(self._awaiting_images.values()):
            self._note(record, "build", step.describe())

    async def _images_for(self, record: VmRecord) -> Images:
        """The kernel and image this VM boots (ProbeFailed at `images` if they cannot be had)."""
        self._awaiting_images[record.vm_id] = record
        try:
            return await self._resolve_images()
        except (BrowserVMError, OSError) as exc:
            raise ProbeFailed(hops.IMAGES, str(exc)) from exc
        finally:
            del self._awaiting_images[record.vm_id]

    async def _use_snapshot(self, record: VmRecord) -> None:
        """Restore the VM from the snapshot of its inputs, if there is one; else it boots cold while the
        snapshot is made in the background."""
        snapshot = await self.snapshot_of(record.vcpus, record.mem_mib)
        if snapshot is not None:
            record.started_from, record.snapshot = "restored", snapshot.key
        elif not self._snapshot_lock.locked():
            self._own(self._snapshot_quietly(record.vcpus, record.mem_mib))

    async def _create(self, record: VmRecord, extra_boot_args: tuple[str, ...], restore: bool,
                      report: StageCallback) -> VmRecord:
        """`restore`: choose a snapshot here, once the kernel and image are known."""
        try:
            images = await self._images_for(record)
            if restore:
                await self._use_snapshot(record)
            snapshot = await asyncio.to_thread(self.snapshots.get, record.snapshot) if record.snapshot else None
            if record.snapshot and snapshot is None:
                raise VmmError(record.vm_id, "restore", f"snapshot {record.snapshot} is gone")
            spawn = (partial(self._spawn, record, images, extra_boot_args) if snapshot is None
                     else partial(self._restore, record, images, snapshot))
            for stage, work in ((hops.NET_LEASE, partial(self._lease, record)),
                                (hops.NET_TAP, partial(self._add_tap, record)),
                                (hops.DISK_CLONE, partial(self._clone_disk, record, images, snapshot)),
                                (hops.VMM_SPAWN, spawn)):
                await uninterrupted(work)
                await self._passed(record, stage, report)
            try:
                await self._readiness(record, report)
            except ProbeFailed as exc:
                if not await self._retry_under_tcg(record, images, extra_boot_args, exc, report):
                    raise
                await self._readiness(record, report)
            record.state = transition(record.vm_id, record.state, VmState.READY)
            record.owner = ""
            await uninterrupted(partial(self._records.save, record))
        except BaseException as exc:
            await self._fail(record, exc)
            if _reported_in_record(exc):
                return record
            raise
        self._notify(record, "ready")
        self.watch(record)
        return record

    async def _passed(self, record: VmRecord, stage: str, report: StageCallback) -> None:
        """Record that `stage` passed (compare-and-set: a destroy meanwhile ends the create here)."""
        record.stages[stage] = round(time.time() - record.created_at, 3)
        await uninterrupted(partial(self._records.save, record))
        report(stage, record.stages[stage])
        self._notify(record, stage)
        crash_point(f"{stage}:done")

    # The resource stages: blocking, run in a thread; each writes what it made into the record
    # before it returns, so a cancellation that waits for it knows what to release.

    def _lease(self, record: VmRecord) -> None:
        lease = self._ipam.lease(record.vm_id)
        record.address, record.gateway = str(lease.address), str(lease.gateway)
        record.tap, record.mac, record.bridge = lease.tap, lease.mac, lease.bridge

    def _add_tap(self, record: VmRecord) -> None:
        self._network.add_tap(Lease(vm_id=record.vm_id, address=IPv4Interface(record.address),
                                    gateway=IPv4Address(record.gateway), bridge=record.bridge, tap=record.tap,
                                    mac=record.mac))

    def _clone_disk(self, record: VmRecord, images: Images, snapshot: Snapshot | None = None) -> None:
        source = images.disk_template if snapshot is None else snapshot.overlay  # the disk as it was then
        directory = Path(record.directory)
        directory.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_room(source.stat().st_size)
        directory.mkdir(mode=0o700)
        clone_sparse(source, directory / "overlay.ext4")

    def _check_room(self, disk_size: int) -> None:
        """Refuse a VM whose disk could not fill up once every VM's disk is full (a sparse copy takes
        room only as the guest writes): guests fill their own disks, never the host's."""
        owed = 0
        for overlay in self._vm_root.glob("*/overlay.ext4"):
            try:
                st = overlay.stat()
            except FileNotFoundError:
                continue  # released meanwhile
            owed += max(0, st.st_size - st.st_blocks * 512) + MAX_DISK  # and its console
        usage = os.statvfs(self._vm_root)
        free = usage.f_bavail * usage.f_frsize
        needed = owed + disk_size + MAX_DISK
        if needed > free:
            raise OSError(errno.ENOSPC, f"No space left on device for this VM's disk: {free / 2**30:.1f} GiB free, "
                                        f"the VMs' disks may still grow by {owed / 2**30:.1f} GiB and this one by "
                                        f"{disk_size / 2**30:.1f} GiB (a smaller BROWSERVM_DISK_MIB, or fewer VMs)",
                          str(self._vm_root))

    def _spawn(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...]) -> None:
        spec = self._spec(record, images, extra_boot_args)
        assert spec.config_disk is not None
        configdisk.write(spec.config_disk, {"vm_id": record.vm_id, "secrets": new_secrets()})
        accel = self._driver.accel(spec.kernel)
        record.accel, record.accel_reason = accel.name, accel.reason
        vmm = self._driver.start(spec, self._network.netns)
        record.pid, record.pid_start_time = vmm.pid, vmm.start_time
        crash_point("vmm.spawn:unrecorded")
        if record.state == VmState.CREATING:  # a retry under TCG spawns a booting VM's VMM again
            record.state = transition(record.vm_id, record.state, VmState.BOOTING)

    def _restore(self, record: VmRecord, images: Images, snapshot: Snapshot) -> None:
        """vmm.spawn for a VM from a snapshot: the VMM resumes offline, and the guest takes this VM's
        identity from its config disk (guest/identity.py) before readiness brings its link up."""
        spec = self._spec(record, images, ())
        config_disk = spec.config_disk
        assert config_disk is not None
        identity: dict[str, object] = {"mac": record.mac, "address": record.address, "gateway": record.gateway,
                                       "entropy": secrets.token_hex(64), "time": time.time()}
        document = {"vm_id": record.vm_id, "secrets": new_secrets(), "identity": identity}
        configdisk.write(config_disk, document)

        def before_resume() -> None:
            # The clock the guest steps to: the host's, as close as can be to the moment it resumes.
            identity["time"] = time.time()
            configdisk.rewrite(config_disk, document)

        accel = self._driver.accel(spec.kernel)
        record.accel, record.accel_reason = accel.name, accel.reason
        if not self._driver.holds_link:  # it wakes as the VM it was taken of: keep that off the bridge
            self._network.set_tap_up(record.tap, False)
        vmm = self._driver.restore(spec, self._network.netns, snapshot.state, before_resume)
        record.pid, record.pid_start_time = vmm.pid, vmm.start_time
        record.state = transition(record.vm_id, record.state, VmState.BOOTING)

    def _link_up(self, record: VmRecord, images: Images) -> None:
        """Connect a restored VM to its bridge: through its VMM, or by its TAP where the VMM cannot."""
        if self._driver.holds_link:
            self._driver.link_up(self._spec(record, images, ()))
        else:
            self._network.set_tap_up(record.tap, True)

    def _spec(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...]) -> VmSpec:
        ip = IpConfig.static(IPv4Interface(record.address), IPv4Address(record.gateway), hostname=record.vm_id)
        boot_args = build_boot_args(BootArgs(
            ip=ip, read_only=True, init="/usr/lib/browservm/overlay-init",
            reboot="k" if self._driver.name == "firecracker" else "t", extra=extra_boot_args))
        directory = Path(record.directory)
        return VmSpec(vm_id=record.vm_id, vcpus=record.vcpus, mem_mib=record.mem_mib, kernel=images.kernel,
                      rootfs=images.rootfs, overlay=directory / "overlay.ext4", boot_args=boot_args, tap=record.tap,
                      mac=record.mac, directory=directory, config_disk=directory / CONFIG_DISK,
                      run_as=None if self._vm_uid_base is None else vm_uid(self._vm_uid_base, record.address))

    async def _readiness(self, record: VmRecord, report: StageCallback) -> None:
        """The readiness hops, in order, each within its deadline and raced against the VMM's exit."""
        assert record.pid is not None and record.pid_start_time is not None
        console = ConsoleLog(Path(record.directory) / "console.log")
        deadlines, probes, netns = self._deadlines, self._probes, self._network.netns
        address = IPv4Address(record.address.split("/")[0])
        vmm = VmmProcess(record.pid, record.pid_start_time)
        exited = ExitWatch(vmm)
        # A cold boot is watched for a guest that stops while its VMM lives on (a KVM that cannot run
        # the kernel). Not a restored one: its VMM's control channel is needed to bring its link up.
        trouble = None if record.started_from != "cold" else asyncio.ensure_future(watch_guest(
            self._driver.wait_guest_stopped(_bare_spec(record.vm_id, Path(record.directory))),
            Path(record.directory) / "console.log", vmm, deadlines.kernel_silence))

        async def hop(name: str, work: Awaitable[T], timeout: float) -> T:
            crash_point(f"{name}:during")
            try:
                result = await race(name, work, timeout, exited.future, trouble)
            except TimeoutError:
                raise ProbeFailed(name, f"not done within {timeout:g} s") from None
            await self._passed(record, name, report)
            return result

        try:
            network = await hop(hops.GUEST_NETWORK, probes.guest_network(console, deadlines.guest_network),
                                deadlines.guest_network + 1)
            record.guest_network_by = network.by
            if record.started_from != "cold":  # it has taken its own identity: connect it
                await uninterrupted(partial(self._link_up, record, await self._resolve_images()))
            mac = await hop(hops.NET_ARP, probes.arp(netns, record.bridge, IPv4Address(record.gateway), address,
                                                     deadlines.arp), deadlines.arp + 1)
            if mac != record.mac:
                raise ProbeFailed(hops.NET_ARP, f"{address} answered from {mac}, not from this VM's MAC "
                                                f"{record.mac}: another machine holds the address")
            path = desktop_path_named(record.desktop_path)
            await hop(hops.DESKTOP_READY, probes.desktop_ready(console, deadlines.desktop, path.listener),
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
        await self._probes.desktop_complete(console, self._deadlines.desktop)
        if record.started_from == "cold":
            await self._browser_painted(record)

    async def _retry_under_tcg(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...],
                               exc: ProbeFailed, report: StageCallback) -> bool:
        """After KVM stopped a cold-booted guest (under --accel auto): stop choosing KVM for its kernel,
        start the VM's VMM again under TCG on a fresh disk, and say so in the record; False when that
        does not apply (another failure, not KVM, a retry already, an accelerator set by hand)."""
        if exc.hop not in (hops.VMM_STOPPED, hops.GUEST_STALLED) or record.accel != "kvm" or record.retried_after:
            return False
        if not await uninterrupted(partial(self._driver.demote_accel, images.kernel,
                                           f"a guest of this kernel stopped under KVM ({exc.hop}: {exc.reason})")):
            return False
        evidence, vmm_log = await uninterrupted(partial(self._evidence, record))
        record.retried_after = {"accel": record.accel, "hop": exc.hop, "reason": exc.reason,
                                "stages": dict(record.stages), "evidence": list(evidence), "vmm_log": list(vmm_log)}
        log.warning("%s: %s: %s; trying again under TCG", record.vm_id, exc.hop, exc.reason)

        def start_over() -> None:
            self._stop_vmm(record)
            self._driver.release(record.vm_id)
            directory = Path(record.directory)
            for name in ("overlay.ext4", CONFIG_DISK, "console.log", "vmm.log"):
                (directory / name).unlink(missing_ok=True)
            clone_sparse(images.disk_template, directory / "overlay.ext4")

        await uninterrupted(start_over)
        record.pid = record.pid_start_time = None
        for stage in (hops.VMM_SPAWN, *hops.READINESS):
            record.stages.pop(stage, None)
        await uninterrupted(partial(self._records.save, record))
        self._note(record, "retry", f"{exc.hop}: {exc.reason}; trying once more under TCG")
        await uninterrupted(partial(self._spawn, record, images, extra_boot_args))
        await self._passed(record, hops.VMM_SPAWN, report)
        return True

    async def _fail(self, record: VmRecord, exc: BaseException) -> None:
        """Record why the create failed, then release the VM (unless kept). Runs to its end even if cancelled."""
        if isinstance(exc, StateConflict):
            # Someone else changed the record (a destroy): they own it now; only undo what this create made.
            await uninterrupted(partial(self._release, record))
            return
        hop, reason = _hop_and_reason(exc, _next_stage(record))
        hint = exc.hint if isinstance(exc, ProbeFailed) and exc.hint else hops.hint(hop)
        await self._record_failure(record, hop, reason, hint)
        await self._settle(record)

    async def _record_failure(self, record: VmRecord, hop: str, reason: str, hint: str) -> None:
        """Put the failure in the record (not yet saved), with what the console and the VMM's own log
        showed last: copied now, before the VM's directory goes."""
        console, vmm_log = await uninterrupted(partial(self._evidence, record))
        record.failure = Failure(hop=hop, reason=reason, hint=hint, evidence=console, vmm_log=vmm_log)
        record.failed_at = time.time()
        record.state = transition(record.vm_id, record.state, VmState.FAILED)

    def _evidence(self, record: VmRecord) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The console's last lines and the VMM's log's (its stderr: QEMU's own words). Blocking."""
        directory = Path(record.directory)
        return (tuple(ConsoleLog(directory / "console.log").tail(_CONSOLE_EVIDENCE)),
                tuple(_tail(directory / "vmm.log", _VMM_LOG_EVIDENCE)))

    async def _settle(self, record: VmRecord) -> None:
        """Save a failed record, then release its resources unless kept.

        On a conflict the record belongs to whoever changed it: this writer only releases what it
        made, and the StateConflict goes on to its caller.
        """
        try:
            await uninterrupted(partial(self._records.save, record))
            self._notify(record, "failed")
            if record.keep:
                return
            errors = await uninterrupted(partial(self._release, record))
            if errors:
                assert record.failure is not None
                record.failure = dataclasses.replace(record.failure, cleanup=tuple(errors))
            else:
                record.holds_resources = False
                record.pid = record.pid_start_time = None
            record.owner = ""
            await uninterrupted(partial(self._records.save, record))
        except StateConflict:
            await uninterrupted(partial(self._release, record))
            raise

    # --- release: the one way a VM's resources go -----------------------------------------

    def _release(self, record: VmRecord) -> list[str]:
        """Stop the VMM, then remove its placement, TAP, lease and directory, each only if still there.

        Blocking. Tries every resource even when one fails; returns one line per failure.
        """
        errors: list[str] = []

        def attempt(what: str, work: Callable[[], object]) -> None:
            try:
                work()
            except (BrowserVMError, OSError) as exc:
                errors.append(f"{what}: {exc}")
            crash_point(f"release.{what.replace(' ', '-')}:done")

        attempt("vmm", lambda: self._stop_vmm(record))
        attempt("vmm placement", lambda: self._driver.release(record.vm_id))
        attempt("tap", lambda: self._network.remove_tap(record.vm_id))
        attempt("lease", lambda: self._ipam.release(record.vm_id))
        directory = Path(record.directory)
        if directory.parent == self._vm_root:
            attempt("directory", lambda: _remove_tree(directory))
        return errors

    def _stop_vmm(self, record: VmRecord) -> None:
        directory = Path(record.directory)
        if record.pid is not None and record.pid_start_time is not None:
            found = [VmmProcess(record.pid, record.pid_start_time)]
        else:  # a crash between spawning the VMM and recording it: find it by its identity
            found = [vmm for vmm, vm_id in self._driver.running(self._vm_root).items() if vm_id == record.vm_id]
        for vmm in found:
            if self._driver.is_vmm_of(vmm, directory):
                # Stopping needs only the VM's directory (its control socket), not its images.
                spec = VmSpec(record.vm_id, record.vcpus, record.mem_mib, Path(), Path(), None, "", record.tap,
                              record.mac, directory)
                self._driver.stop(spec, vmm, self._deadlines.stop)

    # --- snapshots -----------------------------------------------------------------------

    async def _snapshot_key(self, vcpus: int, mem_mib: int) -> tuple[str, dict[str, str]]:
        images = await self._resolve_images()
        spec = VmSpec("vm", vcpus, mem_mib, images.kernel, images.rootfs, Path("/vm/overlay"), "", "tap",
                      "02:00:00:00:00:00", Path("/vm"), Path("/vm/config"))
        vmm = await asyncio.to_thread(self._driver.snapshot_inputs, spec)
        return await asyncio.to_thread(self.snapshots.key, images.kernel, images.rootfs, vcpus, mem_mib, vmm)

    async def snapshot_of(self, vcpus: int = 1, mem_mib: int = 1024) -> Snapshot | None:
        """The snapshot made with today's inputs for VMs of this size, if there is one."""
        key, _ = await self._snapshot_key(vcpus, mem_mib)
        return await asyncio.to_thread(self.snapshots.get, key)

    async def snapshot(self, vcpus: int = 1, mem_mib: int = 1024) -> Snapshot:
        """The snapshot for VMs of this size: made now, from a VM booted until its browser is on
        screen, unless one exists for today's inputs. One at a time; the VM it was made of is gone after."""
        async with self._snapshot_lock:
            key, inputs = await self._snapshot_key(vcpus, mem_mib)
            found = await asyncio.to_thread(self.snapshots.get, key)
            if found is not None:
                return found
            # Booted: what a snapshot is of.
            record = await self.create(vcpus=vcpus, mem_mib=mem_mib, restore=False, purpose="snapshot")
            if record.state != VmState.READY:
                failure = record.failure
                raise VmmError(record.vm_id, "snapshot", f"the VM to snapshot failed at "
                                                         f"{failure.hop if failure else '?'}: "
                                                         f"{failure.reason if failure else ''}")
            staged = await asyncio.to_thread(self.snapshots.staging, key)
            try:
                await self._settled(record)  # its browser painted: its readiness waited for that
                spec = self._spec(record, await self._resolve_images(), ())
                await uninterrupted(partial(self._driver.save, spec, staged / "state"))
                await uninterrupted(partial(clone_sparse, Path(record.directory) / "overlay.ext4",
                                            staged / "overlay.ext4"))
                return await asyncio.to_thread(self.snapshots.publish, staged, key, inputs, record.vm_id)
            except BaseException:
                await asyncio.to_thread(self.snapshots.discard, staged)
                raise
            finally:
                await self.destroy(record.vm_id)

    async def _browser_painted(self, record: VmRecord) -> None:
        """Wait until the browser is on the VM's screen, judged by its pixels, when its desktop has one.

        Watched over the rfb path's port whatever the VM's desktop path: x11vnc listens on the
        guest's address whenever it has a password, and every VM has one. The watcher hangs up and
        waits until x11vnc let it go: a snapshot taken with x11vnc still counting a viewer would wake
        in every clone sending frames to a gone address.
        """
        lines = await asyncio.to_thread(ConsoleLog(Path(record.directory) / "console.log").tail, 5000)
        if "chromium" not in desktop_services(lines):
            return
        password = (await asyncio.to_thread(self.secrets, record.vm_id)).get("vnc")
        if password is None:
            raise ProbeFailed(hops.DESKTOP_COMPLETE, "the VM's config disk has no VNC password to watch its screen "
                                                     "with")
        timeout = self._deadlines.screen
        try:
            await self._probes.browser_on_screen(self._network.netns, IPv4Address(record.address.split("/")[0]),
                                                 PATHS[RFB].port, password, timeout)
        except ProbeFailed as exc:
            raise ProbeFailed(hops.DESKTOP_COMPLETE, f"Chromium runs but its window never showed: {exc}") from exc
        except (TimeoutError, ScreenError, HandshakeFailed, OSError) as exc:
            raise ProbeFailed(hops.DESKTOP_COMPLETE, f"Chromium runs but its window never showed within "
                                                     f"{timeout:g} s: {exc or type(exc).__name__}") from exc

    async def _settled(self, record: VmRecord) -> None:
        """Wait until the VM is idle. Chromium goes on starting for some 15 s (under emulation) after it
        painted: a snapshot taken then makes every clone do that work again, at a whole CPU, just when
        its user arrives (measured: a clone took 17 s to settle, its first viewer waited over 1 s)."""
        assert record.pid is not None and record.pid_start_time is not None
        try:
            share = await self._probes.settled(VmmProcess(record.pid, record.pid_start_time), self._deadlines.settle)
        except TimeoutError as exc:
            log.warning("snapshot of %s taken busy: %s", record.vm_id, exc)  # slower clones, not wrong ones
            return
        except ProbeFailed as exc:
            raise VmmError(record.vm_id, "snapshot", f"the VM to snapshot stopped: {exc.reason}") from exc
        log.info("snapshot of %s: the VM is idle (%.0f%% of a CPU)", record.vm_id, share * 100)

    async def _snapshot_quietly(self, vcpus: int, mem_mib: int) -> None:
        """Make the snapshot in the background; a failure is logged, and VMs keep booting cold."""
        try:
            await self.snapshot(vcpus, mem_mib)
        except (BrowserVMError, OSError) as exc:
            log.warning("snapshot for %d vCPU / %d MiB VMs: %s", vcpus, mem_mib, exc)

    def cap_consoles(self) -> dict[str, int]:
        """Keep every VM's console log within console.MAX_DISK on disk: VM id -> bytes freed. Blocking.

        A guest can print without end; without this its console would fill the host's disk.
        """
        freed = {}
        for directory in self._vm_root.iterdir() if self._vm_root.is_dir() else ():
            try:
                count = cap_console(directory / "console.log")
            except OSError as exc:
                raise VmmError(directory.name, "cap console", f"{exc.filename}: {exc.strerror}") from exc
            if count:
                freed[directory.name] = count
        return freed

    async def new_agent_key(self, vm_id: str) -> None:
        """Give the VM's agent a new key on its config disk (a pooled VM's claim): the agent checks each
        request against the disk's key, so the new key works at once and the old one stops."""
        validate_vm_id(vm_id)
        path = self._vm_root / vm_id / CONFIG_DISK

        def rekey() -> None:
            try:
                document = configdisk.read(path)
                document.setdefault("secrets", {})["agent"] = new_secrets()["agent"]
                configdisk.rewrite(path, document)
            except (OSError, configdisk.ConfigDiskError) as exc:
                raise VmmError(vm_id, "new agent key", f"{path}: {exc}") from exc

        await uninterrupted(rekey)

    def secrets(self, vm_id: str) -> dict[str, str]:
        """The secrets the VM's config disk carries (the agent's key, the desktop's password). Blocking."""
        try:
            document = configdisk.read(self._vm_root / validate_vm_id(vm_id) / CONFIG_DISK)
        except (OSError, configdisk.ConfigDiskError) as exc:
            raise VmmError(vm_id, "read config disk", str(exc)) from exc
        secrets: dict[str, str] = document.get("secrets", {})
        return secrets

    # --- find ----------------------------------------------------------------------------

    async def get(self, vm_id: str) -> VmRecord | None:
        validate_vm_id(vm_id)
        return await asyncio.to_thread(self._records.get, vm_id)

    async def settled(self, vm_id: str) -> VmRecord | None:
        """The VM's record once a create of it in this process has ended (at once when none runs here)."""
        creating = self._creating.get(vm_id)
        if creating is not None:
            await asyncio.wait({creating})  # its outcome is in the record; the create's own caller sees errors
        return await self.get(vm_id)

    async def all(self) -> list[VmRecord]:
        return await asyncio.to_thread(self._records.all)

    def console(self, vm_id: str) -> ConsoleLog:
        return ConsoleLog(self._vm_root / validate_vm_id(vm_id) / "console.log")

    # --- watch ---------------------------------------------------------------------------

    async def watch_all(self) -> None:
        """Watch every VM that should be running, and the processes working on VMs, including other ones'."""
        for record in await self.all():
            if record.state == VmState.READY:
                self.watch(record)
            elif record.owner and record.owner != self._me and record.vm_id not in self._watched:
                self._watch_owner(record)

    def watch(self, record: VmRecord) -> None:
        """Mark the VM failed, with its console tail, the moment its VMM exits."""
        if record.vm_id in self._watched or record.pid is None or record.pid_start_time is None:
            return
        watch = ExitWatch(VmmProcess(record.pid, record.pid_start_time))
        self._watched[record.vm_id] = watch
        watch.future.add_done_callback(lambda future: self._exited(record.vm_id, future))

    def _watch_owner(self, record: VmRecord) -> None:
        """When the process creating or destroying a VM dies, take over (as a restart's reconcile would)."""
        pid, _, start = record.owner.partition(":")
        if not (pid.isdigit() and start.isdigit()):
            return
        watch = ExitWatch(VmmProcess(int(pid), int(start)))
        self._watched[record.vm_id] = watch

        def owner_gone(future: asyncio.Future[None]) -> None:
            self._watched.pop(record.vm_id, None)
            if not future.cancelled():
                self._own(self._reconcile_vm(record.vm_id))
        watch.future.add_done_callback(owner_gone)

    def _exited(self, vm_id: str, future: asyncio.Future[None]) -> None:
        self._watched.pop(vm_id, None)
        if not future.cancelled():
            self._own(self._mark_dead(vm_id, "the VMM process exited"))

    async def _mark_dead(self, vm_id: str, reason: str) -> None:
        record = await asyncio.to_thread(self._records.get, vm_id)
        if record is None or record.state not in _LIVE or (record.owner and owner_alive(record.owner)
                                                            and record.owner != self._me):
            return
        await self._record_failure(record, hops.VMM_EXITED, reason, hops.hint(hops.VMM_EXITED))
        record.owner = self._me
        try:
            await self._settle(record)
        except StateConflict:
            return  # destroyed meanwhile: nothing to report
        if self.on_failure is not None:
            self.on_failure(record)

    # --- destroy and reconcile -----------------------------------------------------------

    async def destroy(self, vm_id: str, *, ended_reason: str = "") -> bool:
        """Stop the VM and remove everything it had; False when there was no such VM. Idempotent.

        With `ended_reason` (the reaper's "idle for 15 min", ...) the record stays, in state
        `ended`, to say why; without, it is deleted. A create of this VM in this process is
        cancelled first (it releases what it made); a create in another process loses its next
        compare-and-set and undoes what it made itself.
        """
        validate_vm_id(vm_id)
        creating = self._creating.get(vm_id)
        if creating is not None:
            creating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait_out(creating)
        watched = self._watched.pop(vm_id, None)
        if watched is not None:
            watched.close()
        while True:
            record = await asyncio.to_thread(self._records.get, vm_id)
            if record is None:
                return False
            if ended_reason and record.state == VmState.ENDED:
                return True
            record.state = transition(vm_id, record.state, VmState.DESTROYING)
            record.owner = self._me
            record.ended_reason = ended_reason
            try:
                await uninterrupted(partial(self._records.save, record))
            except StateConflict:
                continue  # changed meanwhile: read it again
            break
        crash_point("destroy:marked")
        await self._finish_destroy(record)
        return True

    async def _finish_destroy(self, record: VmRecord) -> None:
        errors = await uninterrupted(partial(self._release, record))
        if errors:
            raise CleanupFailed(record.vm_id, errors)
        with contextlib.suppress(StateConflict):  # another destroy finished first
            if record.ended_reason:
                record.state = transition(record.vm_id, record.state, VmState.ENDED)
                record.holds_resources = False
                record.pid = record.pid_start_time = None
                record.owner = ""
                await uninterrupted(partial(self._records.save, record))
                self._notify(record, "ended")
            else:
                await uninterrupted(partial(self._records.delete, record))
                self._notify(record, "destroyed")

    async def reconcile(self) -> list[str]:
        """After a (re)start: settle every VM no live process is working on, and remove orphans of ours.

        Returns one line per thing done, for the log. Only touches what carries browservm's marks:
        records in its store, TAPs with its alias, leases in its store, directories under its VM
        root, VMM processes recognised as VMs of this VM root by their identity.
        """
        # What exists is listed before the records are read: every resource is made after its
        # record is written, so a resource listed here has a record in the read below, unless that
        # record was deleted meanwhile, by someone who released its resources.
        taps, leases, vmms, directories = await asyncio.to_thread(self._resources)
        actions, settled = [], set()
        for record in await self.all():
            if done := await self._reconcile_vm(record.vm_id):
                actions += done
                settled.add(record.vm_id)
        records = await self.all()
        # Not orphans: what a record holds, and what the reconcile above has just released.
        holding = {record.vm_id for record in records if record.holds_resources} | settled
        known = {record.vm_id for record in records}
        removals: list[tuple[str, Callable[[], object]]] = [
            *((f"orphan VMM {vmm.pid} of {vm_id}", partial(self._stop_orphan, vmm, vm_id))
              for vmm, vm_id in vmms.items() if vm_id not in holding),
            *((f"orphan TAP {tap} of {vm_id}", partial(self._network.remove_tap, vm_id))
              for tap, vm_id in taps.items() if vm_id not in holding),
            *((f"orphan lease {lease.address.ip} of {lease.vm_id}", partial(self._ipam.release, lease.vm_id))
              for lease in leases if lease.vm_id not in holding),
            *((f"orphan directory {directory}", partial(_remove_tree, directory))
              for directory in directories if directory.name not in known)]
        for what, work in removals:
            try:
                await uninterrupted(work)
                actions.append(f"removed {what}")
            except (BrowserVMError, OSError) as exc:
                actions.append(f"could not remove {what}: {exc}")
        return actions

    def _stop_orphan(self, vmm: VmmProcess, vm_id: str) -> None:
        self._driver.stop(_bare_spec(vm_id, self._vm_root / vm_id), vmm, self._deadlines.stop)
        self._driver.release(vm_id)

    def _resources(self) -> tuple[dict[str, str], list[Lease], dict[VmmProcess, str], list[Path]]:
        directories = sorted(self._vm_root.iterdir()) if self._vm_root.is_dir() else []
        return (self._network.owned_taps(), self._ipam.leases(), self._driver.running(self._vm_root),
                [d for d in directories if d.is_dir()])

    async def _reconcile_vm(self, vm_id: str) -> list[str]:
        """Settle one VM that no live process is working on: finish, fail, adopt or watch it."""
        record = await asyncio.to_thread(self._records.get, vm_id)
        if record is None:
            return []
        if record.owner and record.owner != self._me and owner_alive(record.owner):
            self._watch_owner(record)
            return [f"{vm_id}: {record.state.value} by process {record.owner.split(':')[0]}, left to it"]
        alive = await asyncio.to_thread(self._vmm_alive, record)
        try:
            if record.state == VmState.DESTROYING:
                record.owner = self._me
                await uninterrupted(partial(self._records.save, record))
                await self._finish_destroy(record)
                return [f"finished {'ending' if record.ended_reason else 'destroying'} {vm_id}"]
            if record.state == VmState.READY and alive:
                self.watch(record)
                return [f"{vm_id}: VMM {record.pid} alive, watching"]
            if record.state == VmState.BOOTING and alive:
                record.owner = self._me
                await uninterrupted(partial(self._records.save, record))
                self._own(self._adopt(record))
                return [f"{vm_id}: VMM {record.pid} alive, its creator gone: adopted, resuming readiness"]
            if record.state in _LIVE:
                hop, reason = (hops.VMM_EXITED, "the VMM exited while no controller watched it") if (
                    record.state == VmState.READY or (record.state == VmState.BOOTING and record.pid)) else (
                    hops.CONTROLLER, f"the process creating it ({record.owner or '?'}) stopped during "
                                     f"{_next_stage(record)}")
                await self._record_failure(record, hop, reason, hops.hint(hop))
                record.owner = self._me
                await self._settle(record)
                return [f"{vm_id}: {reason}: marked failed and released"]
            if record.state == VmState.FAILED and record.holds_resources and not record.keep:
                await self._settle(record)
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
        return self._driver.is_vmm_of(VmmProcess(record.pid, record.pid_start_time), Path(record.directory))

    async def _adopt(self, record: VmRecord) -> None:
        """Run the readiness hops again for a VM whose creator died (the console holds all it printed)."""
        try:
            await self._readiness(record, lambda stage, seconds: None)
            record.state = transition(record.vm_id, record.state, VmState.READY)
            record.owner = ""
            await uninterrupted(partial(self._records.save, record))
        except BaseException as exc:
            await self._fail(record, exc)
            if not _reported_in_record(exc):
                raise
            return
        self._notify(record, "ready")
        self.watch(record)


async def _already(record: VmRecord) -> VmRecord:
    return record


def _reported_in_record(exc: BaseException) -> bool:
    """A failure the record explains (a hop, an OS error); anything else also propagates."""
    return isinstance(exc, (BrowserVMError, OSError, VmmExited)) and not isinstance(exc, StateConflict)


def _next_stage(record: VmRecord) -> str:
    """The first hop the record has not passed: where its creator was when it stopped."""
    names = desktop_path_named(record.desktop_path).names
    return next((name for name in names if name not in record.stages), names[-1])


def _bare_spec(vm_id: str, directory: Path) -> VmSpec:
    return VmSpec(vm_id, 1, 0, Path(), Path(), None, "", "", "", directory)


def _tail(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log the VMM writes (bounded: only its last 64 KiB are read)."""
    try:
        with path.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, os.SEEK_END) - _VMM_LOG_READ))
            data = stream.read(_VMM_LOG_READ)
    except FileNotFoundError:
        return []
    return [line[:1000] for line in without_dumps(data.decode(errors="replace").splitlines())][-count:]


def _remove_tree(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)


def _hop_and_reason(exc: BaseException, stage: str) -> tuple[str, str]:
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
