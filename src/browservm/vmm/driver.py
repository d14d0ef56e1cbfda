"""The one small interface every VMM driver offers, and the choice between them."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from browservm.errors import InvalidInput, VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.vmdir import VmDirectory
from browservm.vmm import firecracker, firecracker_snapshot, placement, process, qmp, snapshot
from browservm.vmm.accel import Accel, AccelMode, AccelProbe
from browservm.vmm.placement import Placement, choose_placement
from browservm.vmm.process import VmmProcess
from browservm.vmm.qemu import QEMU, qemu_argv, qemu_limits, qemu_rlimits
from browservm.vmm.spec import VmSpec


class VmmDriver(Protocol):
    name: str
    holds_link: bool  # it can hold a restored VM's link down (link_up); else the manager holds its TAP down
    reboot: str  # the guest kernel's reboot= that ends its VMM: how this VMM notices a guest's reboot
    placement: Placement  # where its VMMs run, and why there (for diagnostics)

    def accel(self, kernel: Path) -> Accel:
        """The accelerator VMs of `kernel` run with, and why (blocking: it may probe once)."""
        ...

    def demote_accel(self, kernel: Path, reason: str) -> bool:
        """Stop choosing KVM for `kernel` because a guest of it stopped under KVM; True when that changed
        the choice (the accelerator is chosen automatically and was KVM)."""
        ...

    def accel_status(self) -> str:
        """The accelerator setting and what it chose so far, in words (host status, /readyz). Blocking."""
        ...

    async def wait_guest_stopped(self, spec: VmSpec) -> str:
        """Return, with the VMM's own words, once the VMM stops running the guest while it lives on (a KVM
        internal error pauses the guest, the VMM stays). Never returns while the guest runs; VmmError when
        the VMM cannot be watched. Holds the VMM's control channel while it waits."""
        ...

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess: ...

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None: ...

    def release(self, vm_id: str) -> None:
        """Remove what the driver made for this VM outside its directory (its cgroup or scope, a jail),
        ending anything still running there. Idempotent; safe when the VMM never started."""
        ...

    def is_vmm_of(self, vmm: VmmProcess, directory: Path) -> bool:
        """Whether `vmm` is alive and is the VMM of the VM in `directory` (process.is_vmm_of: by its
        recorded identity and where it stands, never by a command-line word)."""
        ...

    def running(self, vm_root: Path) -> dict[VmmProcess, str]:
        """Every running VMM of a VM directory under `vm_root`, with its VM id (process.owned_vmms)."""
        ...

    def snapshot_inputs(self, spec: VmSpec) -> dict[str, str]:
        """What a snapshot of a VM like `spec` depends on besides its kernel and image (the VMM binary,
        its device model): a snapshot is used only where all of these are the same."""
        ...

    def save(self, spec: VmSpec, target: Path) -> None:
        """Write the running VM's whole state to `target`; the VM is left paused, its link down."""
        ...

    def restore(self, spec: VmSpec, netns: NetworkNamespace, state: Path,
                before_resume: Callable[[], None]) -> VmmProcess:
        """Start a VMM from `state` with `spec`'s own disks, TAP and console; it resumes offline."""
        ...

    def link_up(self, spec: VmSpec) -> None:
        """Connect a restored VM to its bridge."""
        ...


def _kill(spec: VmSpec, vmm: VmmProcess, graceful_exit: bool, timeout: float) -> None:
    """After a graceful request: wait for the exit, then SIGKILL, then make sure it is gone."""
    if graceful_exit and process.wait_exit(vmm, timeout):
        return
    process.signal_process(vmm, signal.SIGKILL)
    if not process.wait_exit(vmm, 10):
        raise VmmError(spec.vm_id, "stop", f"PID {vmm.pid} survived SIGKILL")


class QemuDriver:
    name = "qemu"
    holds_link = True  # QMP set_link
    reboot = "t"  # a triple fault: QEMU runs with -no-reboot and exits

    def __init__(self, probe: AccelProbe | None = None, qemu: str = QEMU, placement: Placement | None = None) -> None:
        self._probe = probe or AccelProbe(qemu)
        self._qemu = qemu
        self._accel: dict[Path, Accel] = {}
        self.placement = placement or choose_placement()  # `placement.reason` says where VMMs run and why

    def accel(self, kernel: Path) -> Accel:
        if kernel not in self._accel:
            self._accel[kernel] = self._probe.choose(kernel)
        return self._accel[kernel]

    def demote_accel(self, kernel: Path, reason: str) -> bool:
        if self.accel(kernel).name != "kvm" or not self._probe.demote(kernel, reason):
            return False
        del self._accel[kernel]
        return True

    def accel_status(self) -> str:
        return self._probe.summary()

    async def wait_guest_stopped(self, spec: VmSpec) -> str:
        try:
            return await qmp.wait_guest_stopped(spec.control_socket)
        except qmp.QmpError as exc:
            raise VmmError(spec.vm_id, "watch the guest", str(exc)) from exc

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        return self._spawn(spec, netns)

    def _spawn(self, spec: VmSpec, netns: NetworkNamespace, *extra: str) -> VmmProcess:
        """QEMU for `spec`; a VM with a uid of its own owns its disk, handed over as a descriptor."""
        overlay_fd = None
        if spec.run_as is not None and spec.overlay is not None:
            try:
                os.chown(spec.overlay, spec.run_as, spec.run_as)
                overlay_fd = os.open(spec.overlay, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise VmmError(spec.vm_id, "start", f"{spec.overlay}: {exc.strerror}") from exc
        try:
            argv = [*qemu_argv(spec, self.accel(spec.kernel).name, self._qemu, overlay_fd), *extra]
            return process.spawn(argv, spec.vmm_log, netns, spec.vm_id, directory=spec.directory,
                                 placement=self.placement, rlimits=qemu_rlimits(spec), limits=qemu_limits(spec),
                                 pass_fds=() if overlay_fd is None else (overlay_fd,))
        finally:
            if overlay_fd is not None:
                os.close(overlay_fd)

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        _kill(spec, vmm, self._quit(spec), timeout)

    def release(self, vm_id: str) -> None:
        self.placement.release(vm_id)

    def is_vmm_of(self, vmm: VmmProcess, directory: Path) -> bool:
        return process.is_vmm_of(vmm, directory)

    def running(self, vm_root: Path) -> dict[VmmProcess, str]:
        return process.owned_vmms(vm_root)

    def snapshot_inputs(self, spec: VmSpec) -> dict[str, str]:
        binary = shutil.which(self._qemu) or self._qemu
        stat = os.stat(binary)
        # The device model with every per-VM value blanked: what must be equal for a state to load.
        blank = dataclasses.replace(spec, vm_id="vm", tap="tap", mac="02:00:00:00:00:00", directory=Path("/vm"),
                                    overlay=Path("/vm/overlay"), config_disk=Path("/vm/config"), run_as=None,
                                    boot_args="", kernel=Path("/kernel"), rootfs=Path("/rootfs"))
        accel = self.accel(spec.kernel).name
        return {"vmm": f"{binary} {stat.st_size} {stat.st_mtime_ns}", "accel": accel,
                "devices": " ".join(qemu_argv(blank, accel, "qemu"))}

    def save(self, spec: VmSpec, target: Path) -> None:
        snapshot.save_state(spec.vm_id, spec.control_socket, target)

    def restore(self, spec: VmSpec, netns: NetworkNamespace, state: Path,
                before_resume: Callable[[], None]) -> VmmProcess:
        vmm = self._spawn(spec, netns, "-incoming", "defer", "-S")
        try:
            snapshot.restore_state(spec.vm_id, spec.control_socket, state, before_resume)
        except BaseException:
            _kill(spec, vmm, False, 10)
            raise
        return vmm

    def link_up(self, spec: VmSpec) -> None:
        snapshot.link_up(spec.vm_id, spec.control_socket)

    def _quit(self, spec: VmSpec) -> bool:
        """Ask QEMU to quit through QMP (it flushes and closes its disks); False if it cannot be asked."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as control:
                control.settimeout(5)
                control.connect(str(spec.control_socket))
                stream = control.makefile("rwb")
                stream.readline()  # the greeting
                for command in ("qmp_capabilities", "quit"):
                    stream.write(json.dumps({"execute": command}).encode() + b"\n")
                    stream.flush()
                    stream.readline()
        except OSError:
            return False
        return True


# Under the jailer, Firecracker runs chrooted as the VM's own uid: it could not write a snapshot
# into the controller's store, and each clone (another uid) could read a shared memory file only
# if it were readable by every VM's uid, or copied per clone. Not built yet: refused plainly.
_JAILED = ("snapshot restore under the jailer is not built yet: a jailed Firecracker can neither write "
           "into the snapshot store nor read a snapshot shared by VMs of different uids; run without "
           "the jailer, or without snapshots and the pool")


class FirecrackerDriver:
    name = "firecracker"
    holds_link = False  # no link control: the manager holds a restored VM's TAP down instead
    reboot = "k"  # the keyboard controller's reset: the one way Firecracker sees a guest reboot, and exits

    def __init__(self, binary: str = firecracker.FIRECRACKER, jailer: firecracker.JailerOptions | None = None,
                 jailer_binary: str = firecracker.JAILER, placement: Placement | None = None,
                 euid: int | None = None) -> None:
        self._binary = shutil.which(binary) or binary
        self._euid = os.geteuid() if euid is None else euid  # the controller's: whether Firecracker would be root
        self._jailer = jailer
        self._jailer_binary = jailer_binary
        self.placement = placement or choose_placement()  # `placement.reason` says where VMMs run and why
        self.jail_base = None if jailer is None else jailer.chroot_base  # jails: <base>/<exec name>/<vm id>/root

    def accel(self, kernel: Path) -> Accel:
        return Accel("kvm", "Firecracker runs guests only under KVM")

    def demote_accel(self, kernel: Path, reason: str) -> bool:
        return False  # there is nothing else to run under

    def accel_status(self) -> str:
        return "kvm: Firecracker runs guests only under KVM"

    async def wait_guest_stopped(self, spec: VmSpec) -> str:
        # Firecracker announces no such change (its API could only be polled for "Paused"): a guest it
        # stops is caught by its silent console (guest.stalled) or the hops' deadlines.
        await asyncio.Future()
        raise AssertionError("unreachable")

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        self._refuse_root(spec, "start")
        if self._jailer is not None:
            firecracker.prepare_jail(spec, self._jailer, self._binary)
            argv = firecracker.jailer_argv(spec, self._jailer, self._jailer_binary, self._binary)
        else:
            config = firecracker.write_vm_config(spec)
            self._touch_log(spec, "start")
            argv = firecracker.firecracker_argv(spec, config, self._binary)
        # Firecracker's stdout is the guest's serial console.
        return process.spawn(argv, spec.console_log, netns, spec.vm_id, directory=spec.directory,
                             placement=self.placement)

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        try:
            firecracker.FirecrackerApi(spec.vm_id, spec.control_socket).send_ctrl_alt_del()
            asked = True
        except VmmError:
            asked = False
        _kill(spec, vmm, asked, timeout)

    def release(self, vm_id: str) -> None:
        self.placement.release(vm_id)
        if self._jailer is None:
            return
        # Given --cgroup limits, the jailer moves Firecracker out of our cgroup into one of its own.
        cgroup2 = placement.cgroup2_root()
        if cgroup2 is not None:
            placement.remove_cgroup(firecracker.jail_cgroup(cgroup2, vm_id, self._binary), vm_id)
        jail = firecracker.jail_root(vm_id, self._jailer, self._binary).parent
        if jail.exists():
            try:
                shutil.rmtree(jail)
            except OSError as exc:
                raise VmmError(vm_id, "release", f"cannot remove jail {exc.filename}: {exc.strerror}") from exc

    def jail_root(self, vm_id: str) -> Path | None:
        """The chroot of this VM's jailed Firecracker (its identity when jailed); None without the jailer."""
        return None if self._jailer is None else firecracker.jail_root(vm_id, self._jailer, self._binary)

    def is_vmm_of(self, vmm: VmmProcess, directory: Path) -> bool:
        return process.is_vmm_of(vmm, directory, self.jail_root(directory.name))

    # Snapshots: Firecracker's /snapshot/create and /snapshot/load (firecracker_snapshot.py says how).
    def snapshot_inputs(self, spec: VmSpec) -> dict[str, str]:
        if self._jailer is not None:
            raise VmmError(spec.vm_id, "snapshot", _JAILED)
        try:
            stat = os.stat(self._binary)
        except OSError as exc:
            raise VmmError(spec.vm_id, "snapshot", f"{self._binary}: {exc.strerror}") from exc
        # The machine with every per-VM value blanked: what must be equal for a state to load.
        vm = VmDirectory(Path("/vm"))
        blank = dataclasses.replace(spec, vm_id="vm", tap="tap", mac="02:00:00:00:00:00", directory=vm.path,
                                    overlay=vm.overlay, config_disk=vm.config_disk,
                                    run_as=None, boot_args="", kernel=Path("/kernel"), rootfs=Path("/rootfs"))
        machine = firecracker.firecracker_config(firecracker.in_vm_directory(blank))
        return {"vmm": f"{self._binary} {stat.st_size} {stat.st_mtime_ns}", "accel": self.accel(spec.kernel).name,
                "devices": json.dumps(machine, sort_keys=True)}

    def save(self, spec: VmSpec, target: Path) -> None:
        """Pause the VM and write its snapshot (`target` and the files beside it); it stays paused.
        Its link stays as it is: Firecracker cannot set one; a clone's TAP is held down instead."""
        if self._jailer is not None:
            raise VmmError(spec.vm_id, "save", _JAILED)
        firecracker_snapshot.save_state(spec.vm_id, spec.control_socket, spec.files.vm_config, target)

    def restore(self, spec: VmSpec, netns: NetworkNamespace, state: Path,
                before_resume: Callable[[], None]) -> VmmProcess:
        """A Firecracker with only its API socket, loaded from `state` with this VM's own disks (by
        their paths relative to its directory) and TAP (under the snapshot's iface_id), then resumed.

        It resumes online as far as Firecracker goes: holding the TAP down until link_up is the
        manager's part (see link_up).
        """
        if self._jailer is not None:
            raise VmmError(spec.vm_id, "restore", _JAILED)
        self._refuse_root(spec, "restore")
        # Checked before anything starts: a state whose drives are not this VM's is refused, not loaded.
        taps = firecracker_snapshot.restore_taps(
            spec.vm_id, firecracker_snapshot.read_snapshot_config(spec.vm_id, state), spec)
        # Not read by Firecracker here: what this VM runs with, for the doctor (its own TAP by
        # network_overrides, its disks by relative paths, its MAC as the guest sets it; only the
        # iface_id inside Firecracker stays the snapshot's).
        firecracker.write_vm_config(spec)
        self._touch_log(spec, "restore")
        # Firecracker's stdout is the guest's serial console.
        vmm = process.spawn(firecracker.firecracker_restore_argv(spec, self._binary), spec.console_log, netns,
                            spec.vm_id, directory=spec.directory, placement=self.placement)
        try:
            firecracker_snapshot.restore_state(spec, state, taps, before_resume)
        except BaseException:
            _kill(spec, vmm, False, 10)
            raise
        return vmm

    def link_up(self, spec: VmSpec) -> None:
        """Nothing to do: Firecracker offers no link control (holds_link is False). The manager keeps
        a restored VM offline by its TAP, held down on the host from before the resume until the
        guest has taken its identity."""

    def _refuse_root(self, spec: VmSpec, step: str) -> None:
        """Never a guest's VMM as root (choose_driver refuses it already; this holds for any caller)."""
        if (refusal := firecracker.root_refusal(self._jailer, spec.run_as, self._euid)) is not None:
            raise VmmError(spec.vm_id, step, refusal)

    @staticmethod
    def _touch_log(spec: VmSpec, step: str) -> None:
        """Firecracker's logger wants an existing file."""
        try:
            spec.vmm_log.touch()
        except OSError as exc:
            raise VmmError(spec.vm_id, step, f"cannot create {spec.vmm_log}: {exc.strerror}") from exc

    def running(self, vm_root: Path) -> dict[VmmProcess, str]:
        return process.owned_vmms(vm_root, self.jail_base)


def choose_driver(name: str, probe: AccelProbe | None = None, jailer: firecracker.JailerOptions | None = None,
                  placement: Placement | None = None, accel: AccelMode = "auto") -> VmmDriver:
    """`firecracker`, `qemu`, or `auto`: Firecracker when it can run here (as root, only through its
    jailer: it cannot drop root itself), else QEMU. VMMs run where `placement` puts them (default:
    choose_placement(), a cgroup of their own)."""
    if name not in ("auto", "firecracker", "qemu"):
        raise InvalidInput("vmm", name, "must be auto, firecracker or qemu")
    where = placement or choose_placement()
    probe = probe or AccelProbe(QEMU, accel)
    if name == "qemu":
        return QemuDriver(probe, placement=where)
    usable, reason = firecracker.available()
    if usable and jailer is None and os.geteuid() == 0:
        usable, reason = False, firecracker.AS_ROOT  # auto takes QEMU, which drops to the VM's uid
    if name == "firecracker" and not usable:
        raise VmmError("-", "choose driver", f"firecracker cannot run here: {reason}")
    return FirecrackerDriver(jailer=jailer, placement=where) if usable else QemuDriver(probe, placement=where)
