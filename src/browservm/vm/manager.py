"""VMManager: creates, finds, watches and destroys browser VMs. No OS calls of its own.

Creating a VM is a list of named stages. The resource stages register their
undo as soon as they succeed; if a later stage fails, the undos run in
reverse, so a failed create leaves nothing behind (unless `keep_failed`):

    net.lease  net.tap  disk.clone  vmm.spawn                      resources
    guest.network  net.arp  desktop.ready  net.tcp  ws.upgrade  rfb.banner   readiness hops

Every readiness hop has its own deadline and is raced against the VMM's
exit, so a crashed VMM is reported as such at once instead of as a timeout
further down the line. A VM that fails keeps a record that says which hop,
why, what the console showed last, and what probably to do about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol, TypeVar

from browservm.bootargs import BootArgs, IpConfig, build_boot_args
from browservm.errors import BrowserVMError, InvalidInput, ProbeFailed, VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.ids import new_vm_id, validate_vm_id
from browservm.images.disk import clone_sparse
from browservm.ipam import Ipam, Lease
from browservm.markers import parse_marker
from browservm.vm import readiness
from browservm.vm.console import ConsoleLog
from browservm.vm.records import Failure, VmRecord, VmRecords
from browservm.vm.state import VmState, transition
from browservm.vm.wsprobe import rfb_banner, websocket_upgrade
from browservm.vmm import process
from browservm.vmm.driver import VmmDriver
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec

T = TypeVar("T")
DESKTOP_PORT = 6080
_CONSOLE_EVIDENCE = 20

HINTS = {
    "vmm": "the VMM process exited; its own log and the console tail say why",
    "guest.network": "the guest never configured eth0. If the console shows the kernel ignored ip=, the kernel lacks "
                     "CONFIG_IP_PNP and the image's browservm-net did not run: use `browservm kernel build` or an "
                     "image built by `browservm image build`",
    "net.arp": "the guest does not answer ARP on its bridge: its interface is down, has another address, or its TAP "
               "is not the one the VMM uses (compare the TAP and MAC in `vm show` with the VMM's configuration)",
    "desktop.ready": "the guest's desktop did not report websockify ready; the console shows which part failed",
    "net.tcp": "nothing accepts connections on :6080 in the guest; the desktop markers on the console show how far "
               "it got",
    "ws.upgrade": "something answers on :6080 but it is not websockify",
    "rfb.banner": "websockify runs but cannot reach x11vnc on localhost:5901",
}


@dataclass(frozen=True)
class Images:
    kernel: Path
    rootfs: Path
    disk_template: Path


@dataclass(frozen=True)
class Deadlines:
    """Seconds each hop may take. Generous: under software emulation a desktop takes a minute to come up."""

    guest_network: float = 180.0
    arp: float = 30.0
    desktop: float = 600.0
    tcp: float = 10.0
    websocket: float = 180.0
    rfb: float = 60.0
    stop: float = 10.0


@dataclass(frozen=True)
class Limits:
    max_vms: int = 32
    max_vms_per_user: int = 4
    vcpus: tuple[int, int] = (1, 8)
    mem_mib: tuple[int, int] = (256, 16384)


StageCallback = Callable[[str, float], None]


class VmNetwork(Protocol):
    """What the manager needs of the host network (HostNetwork is the real one)."""

    netns: NetworkNamespace

    def add_tap(self, lease: Lease) -> None: ...

    def remove_tap(self, vm_id: str) -> bool: ...

    def owned_taps(self) -> dict[str, str]: ...


class _HopFailed(Exception):
    def __init__(self, hop: str, reason: str) -> None:
        super().__init__(reason)
        self.hop = hop
        self.reason = reason


class VMManager:
    def __init__(self, *, records: VmRecords, ipam: Ipam, network: VmNetwork, driver: VmmDriver,
                 images: Callable[[], Images], vm_root: Path, limits: Limits | None = None,
                 deadlines: Deadlines | None = None) -> None:
        self._records = records
        self._ipam = ipam
        self._network = network
        self._driver = driver
        self._images_source = images  # resolved on the first create: it may build a kernel and an image
        self._images: Images | None = None
        self._vm_root = vm_root
        self._limits = limits or Limits()
        self._deadlines = deadlines or Deadlines()
        self._watched: dict[str, _ExitWatch] = {}
        self.on_failure: Callable[[VmRecord], None] | None = None  # told once a dead VM is marked and released

    # --- create --------------------------------------------------------------------------

    async def create(self, user: str = "default", vcpus: int = 1, mem_mib: int = 1024, *,
                     keep_failed: bool = False, extra_boot_args: tuple[str, ...] = (),
                     on_stage: StageCallback | None = None) -> VmRecord:
        """Boot a VM and return once its desktop answers, or its record says which hop failed."""
        self.check_request(user, vcpus, mem_mib, extra_boot_args)
        if self._images is None:
            self._images = self._images_source()
        vm_id = new_vm_id()
        record = VmRecord(vm_id=vm_id, user=user, vcpus=vcpus, mem_mib=mem_mib,
                          directory=str(self._vm_root / vm_id), driver=self._driver.name)
        self._records.insert(record, max_total=self._limits.max_vms, max_per_user=self._limits.max_vms_per_user)
        undo = contextlib.ExitStack()
        report = on_stage or (lambda stage, seconds: None)

        def done(stage: str) -> None:
            record.stages[stage] = round(time.time() - record.created_at, 3)
            report(stage, record.stages[stage])

        try:
            spec = self._allocate(record, undo, extra_boot_args, done)
            await self._boot(record, spec, undo, done)
        except BaseException as exc:
            await self._fail(record, exc, undo, keep_failed)
            if not isinstance(exc, (_HopFailed, BrowserVMError)):
                raise
            return record
        undo.pop_all()
        return record

    def check_request(self, user: str, vcpus: int, mem_mib: int, extra_boot_args: tuple[str, ...] = ()) -> None:
        """Refuse bad input (InvalidInput naming the field) before anything is allocated."""
        if not user or len(user) > 64 or not user.isprintable():
            raise InvalidInput("user", user, "must be 1-64 printable characters")
        low, high = self._limits.vcpus
        if not low <= vcpus <= high:
            raise InvalidInput("vcpus", vcpus, f"must be between {low} and {high}")
        low, high = self._limits.mem_mib
        if not low <= mem_mib <= high:
            raise InvalidInput("mem_mib", mem_mib, f"must be between {low} and {high} MiB")
        build_boot_args(BootArgs(ip=None, extra=extra_boot_args))

    def _allocate(self, record: VmRecord, undo: contextlib.ExitStack, extra_boot_args: tuple[str, ...],
                  done: Callable[[str], None]) -> VmSpec:
        vm_id, images = record.vm_id, self._images
        assert images is not None
        lease = self._ipam.lease(vm_id)
        undo.callback(self._ipam.release, vm_id)
        record.address, record.gateway = str(lease.address), str(lease.gateway)
        record.tap, record.mac, record.bridge = lease.tap, lease.mac, lease.bridge
        done("net.lease")

        self._network.add_tap(lease)
        undo.callback(self._network.remove_tap, vm_id)
        done("net.tap")

        directory = Path(record.directory)
        directory.mkdir(mode=0o700, parents=True)
        undo.callback(shutil.rmtree, directory, ignore_errors=True)
        overlay = directory / "overlay.ext4"
        clone_sparse(images.disk_template, overlay)
        done("disk.clone")

        ip = IpConfig.static(lease.address, lease.gateway, hostname=vm_id)
        boot_args = build_boot_args(BootArgs(
            ip=ip, read_only=True, init="/usr/lib/browservm/overlay-init",
            reboot="k" if self._driver.name == "firecracker" else "t", extra=extra_boot_args))
        return VmSpec(vm_id=vm_id, vcpus=record.vcpus, mem_mib=record.mem_mib, kernel=images.kernel,
                      rootfs=images.rootfs, overlay=overlay, boot_args=boot_args, tap=lease.tap,
                      mac=lease.mac, directory=directory)

    async def _boot(self, record: VmRecord, spec: VmSpec, undo: contextlib.ExitStack,
                    done: Callable[[str], None]) -> None:
        record.accel = self._driver.accel(spec.kernel)
        vmm = self._driver.start(spec, self._network.netns)
        undo.callback(self._driver.stop, spec, vmm, self._deadlines.stop)
        record.pid, record.pid_start_time = vmm.pid, vmm.start_time
        record.state = transition(record.vm_id, record.state, VmState.BOOTING)
        self._records.save(record)
        done("vmm.spawn")

        exited = _ExitWatch(vmm)
        try:
            await self._readiness(record, spec, exited.future, done)
        finally:
            exited.close()
        record.state = transition(record.vm_id, record.state, VmState.READY)
        self._records.save(record)
        self.watch(record)

    async def _readiness(self, record: VmRecord, spec: VmSpec, exited: asyncio.Future[None],
                         done: Callable[[str], None]) -> None:
        console = ConsoleLog(spec.console_log)
        deadlines = self._deadlines
        address = IPv4Address(record.address.split("/")[0])
        netns = self._network.netns

        async def hop(name: str, work: Awaitable[T], timeout: float) -> T:
            result = await _race(name, work, timeout, exited)
            done(name)
            return result

        network = await hop("guest.network", readiness.wait_guest_network(console, deadlines.guest_network),
                            deadlines.guest_network + 1)
        record.guest_network_by = network.by
        mac = await hop("net.arp", readiness.arp_probe(netns, record.bridge, IPv4Address(record.gateway), address,
                                                       deadlines.arp), deadlines.arp + 1)
        if mac != record.mac:
            raise _HopFailed("net.arp", f"{address} answered from {mac}, not from this VM's MAC {record.mac}: "
                                        "another machine holds the address")
        await hop("desktop.ready", _desktop_ready(console, deadlines.desktop), deadlines.desktop)
        reader, writer = await hop("net.tcp", readiness.open_tcp(netns, address, DESKTOP_PORT, deadlines.tcp),
                                   deadlines.tcp + 1)
        try:
            await hop("ws.upgrade", websocket_upgrade(reader, writer, f"{address}:{DESKTOP_PORT}"),
                      deadlines.websocket)
            banner = await hop("rfb.banner", rfb_banner(reader), deadlines.rfb)
        finally:
            writer.close()
        if banner != "RFB 003.008":
            raise _HopFailed("rfb.banner", f"unexpected protocol version {banner!r}")

    async def _fail(self, record: VmRecord, exc: BaseException, undo: contextlib.ExitStack,
                    keep_failed: bool) -> None:
        hop, reason = _hop_and_reason(exc)
        console = ConsoleLog(Path(record.directory) / "console.log")
        record.failure = Failure(hop=hop, reason=reason, hint=HINTS.get(hop, ""),
                                 evidence=tuple(console.tail(_CONSOLE_EVIDENCE)))
        record.failed_at = time.time()
        record.state = transition(record.vm_id, record.state, VmState.FAILED)
        if keep_failed:
            undo.pop_all()
        else:
            await asyncio.to_thread(undo.close)
            record.holds_resources = False
            record.pid = record.pid_start_time = None
        self._records.save(record)

    # --- find ----------------------------------------------------------------------------

    def get(self, vm_id: str) -> VmRecord | None:
        validate_vm_id(vm_id)
        return self._records.get(vm_id)

    def all(self) -> list[VmRecord]:
        return self._records.all()

    def console(self, vm_id: str) -> ConsoleLog:
        return ConsoleLog(self._vm_root / validate_vm_id(vm_id) / "console.log")

    # --- watch ---------------------------------------------------------------------------

    def watch_all(self) -> None:
        """Watch every VM that should be running, including ones another process created."""
        for record in self._records.all():
            if record.state in (VmState.BOOTING, VmState.READY):
                self.watch(record)

    def watch(self, record: VmRecord) -> None:
        """Mark the VM failed, with its console tail, the moment its VMM exits."""
        watched = self._watched.get(record.vm_id)
        if watched is not None and not watched.future.get_loop().is_closed():
            return
        if record.pid is None or record.pid_start_time is None:
            return
        watch = _ExitWatch(VmmProcess(record.pid, record.pid_start_time))
        self._watched[record.vm_id] = watch
        watch.future.add_done_callback(lambda future: self._on_exit(record.vm_id, future))

    def _on_exit(self, vm_id: str, future: asyncio.Future[None]) -> None:
        if future.cancelled():
            return
        self._watched.pop(vm_id, None)
        record = self._records.get(vm_id)
        if record is None or record.state not in (VmState.BOOTING, VmState.READY):
            return
        asyncio.get_running_loop().create_task(self._mark_dead(record, "the VMM process exited"))

    async def _mark_dead(self, record: VmRecord, reason: str) -> None:
        console = ConsoleLog(Path(record.directory) / "console.log")
        record.failure = Failure(hop="vmm", reason=reason, hint=HINTS["vmm"],
                                 evidence=tuple(console.tail(_CONSOLE_EVIDENCE)))
        record.failed_at = time.time()
        record.state = transition(record.vm_id, record.state, VmState.FAILED)
        self._records.save(record)
        await self._release(record)
        record.holds_resources = False
        record.pid = record.pid_start_time = None
        self._records.save(record)
        if self.on_failure is not None:
            self.on_failure(record)

    # --- destroy and reconcile -----------------------------------------------------------

    async def destroy(self, vm_id: str) -> bool:
        """Stop the VM and remove everything it had; False when there was no such VM. Idempotent."""
        validate_vm_id(vm_id)
        record = self._records.get(vm_id)
        if record is None:
            return False
        watched = self._watched.pop(vm_id, None)
        if watched is not None:
            watched.close()
        record.state = transition(vm_id, record.state, VmState.DESTROYING)
        self._records.save(record)
        await self._release(record)
        self._records.delete(vm_id)
        return True

    async def _release(self, record: VmRecord) -> None:
        """Stop the VMM, delete the TAP, release the lease, remove the directory; each only if still there."""
        directory = Path(record.directory)
        if record.pid is not None and record.pid_start_time is not None:
            vmm = VmmProcess(record.pid, record.pid_start_time)
            if process.alive(vmm):
                # Stopping needs only the VM's directory (its control socket), not its images.
                spec = VmSpec(record.vm_id, record.vcpus, record.mem_mib, Path(), Path(), None, "",
                              record.tap, record.mac, directory)
                await asyncio.to_thread(self._driver.stop, spec, vmm, self._deadlines.stop)
        self._network.remove_tap(record.vm_id)
        self._ipam.release(record.vm_id)
        if directory.parent == self._vm_root:
            await asyncio.to_thread(shutil.rmtree, directory, ignore_errors=True)

    async def reconcile(self) -> list[str]:
        """After a (re)start: verify every VM's VMM, fail the dead ones, remove orphans of ours.

        Returns one line per thing done, for the log. Only touches what carries
        browservm's marks: records in its store, TAPs with its alias, leases in
        its store, directories under its VM root, VMM processes whose command
        line names a directory under its VM root.
        """
        actions = []
        records = {record.vm_id: record for record in self._records.all()}
        for record in records.values():
            if record.state == VmState.DESTROYING:
                await self._release(record)
                self._records.delete(record.vm_id)
                actions.append(f"finished destroying {record.vm_id}")
            elif record.holds_resources and not self._vmm_is_ours_and_alive(record):
                if record.state in (VmState.BOOTING, VmState.READY, VmState.CREATING):
                    await self._mark_dead(record, "the VMM exited while the controller was not running")
                    actions.append(f"{record.vm_id}: VMM gone, marked failed and released")
            elif record.state in (VmState.BOOTING, VmState.READY):
                self.watch(record)
                actions.append(f"{record.vm_id}: VMM {record.pid} alive, watching")
        holding = {vm_id for vm_id, record in records.items() if record.holds_resources}
        for tap, vm_id in self._network.owned_taps().items():
            if vm_id not in holding:
                self._network.remove_tap(vm_id)
                actions.append(f"removed orphan TAP {tap} of {vm_id}")
        for lease in self._ipam.leases():
            if lease.vm_id not in holding:
                self._ipam.release(lease.vm_id)
                actions.append(f"released orphan lease {lease.address.ip} of {lease.vm_id}")
        for vmm_pid, vm_id in _vmm_processes_under(self._vm_root).items():
            if vm_id not in holding:
                process.signal_process(vmm_pid, signal.SIGKILL)
                process.wait_exit(vmm_pid, self._deadlines.stop)
                actions.append(f"killed orphan VMM {vmm_pid.pid} of {vm_id}")
        if self._vm_root.is_dir():
            for directory in self._vm_root.iterdir():
                if directory.name not in records:
                    shutil.rmtree(directory, ignore_errors=True)
                    actions.append(f"removed orphan directory {directory}")
        return actions

    def _vmm_is_ours_and_alive(self, record: VmRecord) -> bool:
        if record.pid is None or record.pid_start_time is None:
            return False
        vmm = VmmProcess(record.pid, record.pid_start_time)
        # The start time already tells a recycled PID apart; the VM id in the command line (QEMU's
        # -name, Firecracker's --id, also under the jailer) confirms it is this VM's VMM.
        return process.alive(vmm) and record.vm_id in _cmdline(record.pid)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _vmm_processes_under(vm_root: Path) -> dict[VmmProcess, str]:
    """Running processes whose command line names a VM directory under `vm_root`: VMMs we started."""
    found: dict[VmmProcess, str] = {}
    prefix = str(vm_root) + os.sep
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        cmdline = _cmdline(int(entry.name))
        if prefix not in cmdline or ("qemu" not in cmdline and "firecracker" not in cmdline):
            continue
        vm_id = cmdline.split(prefix, 1)[1].split(os.sep, 1)[0]
        start_time = process.start_time(int(entry.name))
        if start_time is not None:
            found[VmmProcess(int(entry.name), start_time)] = vm_id
    return found


class _ExitWatch:
    """A future that completes when a process exits (its pidfd becomes readable).

    Bound to the event loop that made it; `close` is safe after that loop has ended.
    """

    def __init__(self, vmm: VmmProcess) -> None:
        self._loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self._loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(vmm.pid)
        except ProcessLookupError:
            self.future.set_result(None)
            return
        if not process.alive(vmm):  # exited, or the PID reused, before the pidfd was opened
            self.future.set_result(None)
            return
        self._loop.add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        self.close()

    def close(self) -> None:
        if self._pidfd is None:
            return
        if not self._loop.is_closed():
            self._loop.remove_reader(self._pidfd)
            if not self.future.done():
                self.future.cancel()
        os.close(self._pidfd)
        self._pidfd = None


async def _race(hop: str, work: Awaitable[T], timeout: float, exited: asyncio.Future[None]) -> T:
    """`work` within `timeout`, unless the VMM exits first; failures named after `hop`."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[object]] = {task, exited}  # type: ignore[arg-type]
    done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        try:
            return task.result()
        except ProbeFailed as exc:
            raise _HopFailed(hop, exc.reason) from exc
        except OSError as exc:
            raise _HopFailed(hop, exc.strerror or str(exc)) from exc
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, BrowserVMError):
        await task
    if exited in done:
        raise _HopFailed("vmm", f"the VMM exited while waiting for {hop}")
    raise _HopFailed(hop, f"not done within {timeout:g} s")


async def _desktop_ready(console: ConsoleLog, timeout: float) -> None:
    def websockify_or_failure(line: str) -> bool:
        marker = parse_marker(line)
        return marker is not None and marker[0] == "ready" and (
            marker[1].get("service") == "websockify" or marker[1].get("state") in ("failed", "exited"))

    line = await console.wait_for(websockify_or_failure, timeout)
    if line is None:
        raise ProbeFailed("desktop.ready", f"websockify did not report ready within {timeout:g} s")
    marker = parse_marker(line)
    assert marker is not None
    if marker[1].get("state") != "ready":
        raise ProbeFailed("desktop.ready", f"{marker[1].get('service')} {marker[1].get('state')}: "
                                           f"{marker[1].get('reason') or 'code ' + marker[1].get('code', '?')}")


def _hop_and_reason(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, _HopFailed):
        return exc.hop, exc.reason
    if isinstance(exc, VmmError):
        return "vmm", exc.reason
    if isinstance(exc, BrowserVMError):
        return "create", str(exc)
    if isinstance(exc, asyncio.CancelledError):
        return "create", "cancelled"
    return "create", f"{type(exc).__name__}: {exc}"
