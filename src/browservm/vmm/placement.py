"""Where a VMM process lives: in a control group of its own, outside the controller's.

A session of its own is not enough for a VMM to outlive the controller: a service manager
stops a service by killing every process in the service's control group (systemd's default
KillMode=control-group), and a supervisor kills the whole process tree. So each VMM is put
into a cgroup made for its VM before it runs a single instruction of the VMM:

- `SystemdScope`, where systemd is PID 1: the VMM runs under `systemd-run --scope`, which
  asks systemd (over D-Bus) for a transient scope unit `browservm-<vm id>.scope` in
  `browservm.slice`, moves itself into it and execs the VMM, so the PID stays the same.
  systemd owns the cgroup tree there, so we ask it rather than write into its tree.
- `OwnCgroup`, elsewhere: `browservm-vms/<vm id>` under the root of the cgroup v2
  hierarchy, made before the spawn; the VMM writes itself into it before it execs
  (process.spawn) and the directory is removed once its processes are gone.
- `NoCgroup`: no writable cgroup v2 hierarchy. VMMs still run in sessions of their own, but
  stop with the controller's cgroup; `reason` says why, for diagnostics.

The VM's cgroup also bounds what its VMM may take (`ResourceLimits`: CPU time, memory, tasks):
systemd applies them as the scope's properties; `OwnCgroup` writes `cpu.max`, `memory.max` and
`pids.max` where the hierarchy delegates those controllers to it, and `enforced` says which it
could, so the doctor can say which limits a host does not enforce, instead of pretending.

Every method is idempotent: the manager may release a VM that never started, or twice.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from browservm.errors import VmmError
from browservm.ids import validate_vm_id

MOUNTINFO = Path("/proc/self/mountinfo")
SYSTEMD_RUNTIME = Path("/run/systemd/system")
INIT_COMM = Path("/proc/1/comm")
SLICE = "browservm.slice"
CGROUP_BASE = "browservm-vms"
_RELEASE_TIMEOUT_S = 10.0


CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class ResourceLimits:
    """What one VM's VMM may take at most."""

    cpus: int  # CPU time: this many CPUs' worth
    memory_mib: int  # the guest's memory plus the VMM's own
    tasks: int  # processes and threads

    def cgroup_files(self) -> dict[str, str]:
        """The cgroup v2 interface files and values, per controller."""
        period = 100_000
        return {"cpu": f"cpu.max={self.cpus * period} {period}", "memory": f"memory.max={self.memory_mib * 2**20}",
                "pids": f"pids.max={self.tasks}"}

    def systemd_properties(self) -> list[str]:
        return [f"CPUQuota={self.cpus * 100}%", f"MemoryMax={self.memory_mib}M", f"TasksMax={self.tasks}"]


class Placement(Protocol):
    name: str  # "systemd", "cgroup" or "none"
    reason: str  # why this placement, in a sentence (diagnostics)
    enforced: tuple[str, ...]  # which of CONTROLLERS bound a VM's VMM

    def wrap(self, argv: Sequence[str], vm_id: str, limits: ResourceLimits | None = None) -> list[str]:
        """The command that runs `argv` in this VM's place (the same PID runs the VMM in the end)."""
        ...

    def prepare(self, vm_id: str, limits: ResourceLimits | None = None) -> Path | None:
        """Make the VM's cgroup if the VMM has to join it itself: its `cgroup.procs`, else None."""
        ...

    def release(self, vm_id: str) -> None:
        """Remove the VM's cgroup or scope, ending whatever still runs in it. Idempotent."""
        ...


def systemd_run_argv(argv: Sequence[str], vm_id: str, slice_name: str = SLICE,
                     systemd_run: str = "systemd-run", limits: ResourceLimits | None = None) -> list[str]:
    """`argv` wrapped to run in the transient scope `browservm-<vm_id>.scope` (a value)."""
    validate_vm_id(vm_id)
    properties = [f"--property={p}" for p in limits.systemd_properties()] if limits is not None else []
    # --collect: the unit is forgotten when it ends, even if the VMM failed, so the same name
    # never blocks a later VM and nothing piles up in `systemctl --failed`.
    return [systemd_run, "--scope", "--quiet", "--collect", f"--unit={scope_unit(vm_id)}",
            f"--slice={slice_name}", f"--description=browservm VM {vm_id}", *properties, "--", *argv]


def scope_unit(vm_id: str) -> str:
    return f"browservm-{vm_id}.scope"


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash in paths as octal (`\\040`)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def cgroup2_mount(mountinfo: str) -> Path | None:
    """The mount point of the cgroup v2 hierarchy in a /proc/PID/mountinfo text, or None.

    Hybrid layouts mount it at /sys/fs/cgroup/unified beside the v1 controllers, pure v2
    hosts at /sys/fs/cgroup. A mount of the whole hierarchy (root "/") is preferred over a
    bind mount of one of its subtrees.
    """
    found: list[tuple[str, Path]] = []
    for line in mountinfo.splitlines():
        mount, separator, source = line.partition(" - ")
        fields, source_fields = mount.split(), source.split()
        if not separator or len(fields) < 5 or not source_fields or source_fields[0] != "cgroup2":
            continue
        found.append((_unescape(fields[3]), Path(_unescape(fields[4]))))
    whole = [point for root, point in found if root == "/"]
    if whole:
        return whole[0]
    return found[0][1] if found else None


def cgroup2_root(mountinfo: Path = MOUNTINFO) -> Path | None:
    try:
        return cgroup2_mount(mountinfo.read_text())
    except OSError:
        return None


def systemd_is_init(runtime: Path = SYSTEMD_RUNTIME, init_comm: Path = INIT_COMM) -> bool:
    """The test sd_booted() makes, plus PID 1's name: a container may carry a stray /run/systemd."""
    try:
        return runtime.is_dir() and init_comm.read_text().strip() == "systemd"
    except OSError:
        return False


def delegated_controllers(root: Path) -> tuple[str, ...]:
    """Which of CONTROLLERS the hierarchy at `root` hands to its children (so to ours)."""
    try:
        delegated = (root / "cgroup.subtree_control").read_text().split()
    except OSError:
        return ()
    return tuple(c for c in CONTROLLERS if c in delegated)


def _cgroup_pids(cgroup: Path) -> list[int]:
    return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]


def remove_cgroup(cgroup: Path, vm_id: str, timeout: float = _RELEASE_TIMEOUT_S) -> None:
    """SIGKILL whatever still runs in `cgroup` (and below), wait until it is empty, remove it.

    A cgroup made for one VM holds only that VM's processes, so anything left in it once the
    VMM was stopped belongs to the VM being released. Idempotent.
    """
    if not cgroup.is_dir():
        return
    deadline = time.monotonic() + timeout
    try:
        # Bottom-up: a cgroup with child cgroups cannot be removed (the jailer may make one).
        for directory, _, _ in sorted(os.walk(cgroup), key=lambda entry: -len(entry[0])):
            while True:
                _kill_all(Path(directory))
                try:
                    Path(directory).rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    # EBUSY while the kernel is still taking down what was killed (exited
                    # processes, zombies included, leave the cgroup; ones in D state take a while).
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
    except OSError as exc:
        left = ""
        if exc.errno == errno.EBUSY and cgroup.is_dir():
            left = f" (processes still in it: {_cgroup_pids(cgroup)})"
        raise VmmError(vm_id, "release", f"cannot remove cgroup {exc.filename or cgroup}: "
                                         f"{exc.strerror}{left}") from exc


def _kill_all(cgroup: Path) -> None:
    try:
        pids = _cgroup_pids(cgroup)
    except FileNotFoundError:
        return
    if not pids:
        return
    kill_file = cgroup / "cgroup.kill"
    if kill_file.exists():  # Linux 5.14+: one write, no race with a fork or a recycled PID
        kill_file.write_text("1")
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class OwnCgroup:
    """`browservm-vms/<vm id>` under the root of the cgroup v2 hierarchy mounted at `root`."""

    name = "cgroup"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base = root / CGROUP_BASE
        self.enforced = delegated_controllers(root)
        missing = [c for c in CONTROLLERS if c not in self.enforced]
        limits = (f"; its {', '.join(missing)} limits are not enforced: the hierarchy does not delegate "
                  f"{'that controller' if len(missing) == 1 else 'those controllers'} ({root}/cgroup.subtree_control)"
                  if missing else "")
        self.reason = f"each VMM runs in a cgroup of its own under {self.base}{limits}"

    def cgroup(self, vm_id: str) -> Path:
        return self.base / validate_vm_id(vm_id)

    def wrap(self, argv: Sequence[str], vm_id: str, limits: ResourceLimits | None = None) -> list[str]:
        return list(argv)

    def prepare(self, vm_id: str, limits: ResourceLimits | None = None) -> Path:
        cgroup = self.cgroup(vm_id)
        try:
            self.base.mkdir(exist_ok=True)
            if self.enforced:
                # A controller reaches a cgroup only through every ancestor's subtree_control.
                (self.base / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in self.enforced))
            cgroup.mkdir(exist_ok=True)
            holding = _cgroup_pids(cgroup)
        except OSError as exc:
            raise VmmError(vm_id, "place", f"cannot make cgroup {cgroup}: {exc.strerror}") from exc
        if holding:
            # Its release would kill them: refuse rather than share a cgroup with another VM.
            raise VmmError(vm_id, "place", f"cgroup {cgroup} already holds processes {holding}: "
                                           "another VM with this id is running")
        if limits is not None:
            for controller, setting in limits.cgroup_files().items():
                if controller in self.enforced:
                    name, _, value = setting.partition("=")
                    try:
                        (cgroup / name).write_text(value)
                    except OSError as exc:
                        raise VmmError(vm_id, "place", f"cannot set {cgroup / name} to {value}: "
                                                       f"{exc.strerror}") from exc
        return cgroup / "cgroup.procs"

    def release(self, vm_id: str) -> None:
        remove_cgroup(self.cgroup(vm_id), vm_id)


class SystemdScope:
    """A transient scope per VM, asked of systemd (PID 1) through `systemd-run --scope`."""

    name = "systemd"

    def __init__(self, systemd_run: str = "systemd-run", systemctl: str = "systemctl",
                 slice_name: str = SLICE) -> None:
        self._systemd_run = systemd_run
        self._systemctl = systemctl
        self.slice = slice_name
        self.reason = f"each VMM runs in a transient scope browservm-<vm id>.scope in {slice_name}"
        self.enforced: tuple[str, ...] = CONTROLLERS  # systemd enables what a unit's properties need

    def wrap(self, argv: Sequence[str], vm_id: str, limits: ResourceLimits | None = None) -> list[str]:
        # systemd-run would only say so after it made the scope, in the VMM's log: say it now.
        if shutil.which(argv[0]) is None:
            raise VmmError(vm_id, "start", f"cannot run {argv[0]}: {os.strerror(errno.ENOENT)}")
        return systemd_run_argv(argv, vm_id, self.slice, self._systemd_run, limits)

    def prepare(self, vm_id: str, limits: ResourceLimits | None = None) -> Path | None:
        return None

    def release(self, vm_id: str) -> None:
        unit = scope_unit(validate_vm_id(vm_id))
        try:
            done = subprocess.run([self._systemctl, "stop", unit], capture_output=True, text=True,
                                  timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmmError(vm_id, "release", f"systemctl stop {unit}: {exc}") from exc
        # 5: the unit is not loaded, i.e. already gone (a scope ends with its last process).
        if done.returncode not in (0, 5):
            raise VmmError(vm_id, "release", f"systemctl stop {unit} exited {done.returncode}: "
                                             f"{done.stderr.strip()}")


class NoCgroup:
    """No cgroup could be had: VMMs get sessions of their own and nothing more."""

    name = "none"

    enforced: tuple[str, ...] = ()

    def __init__(self, reason: str) -> None:
        self.reason = reason + "; no CPU, memory or task limits are enforced on VMMs"

    def wrap(self, argv: Sequence[str], vm_id: str, limits: ResourceLimits | None = None) -> list[str]:
        return list(argv)

    def prepare(self, vm_id: str, limits: ResourceLimits | None = None) -> Path | None:
        return None

    def release(self, vm_id: str) -> None:
        return None


def choose_placement(mountinfo: Path = MOUNTINFO, systemd_runtime: Path = SYSTEMD_RUNTIME,
                     init_comm: Path = INIT_COMM) -> Placement:
    """systemd scopes where systemd is PID 1, else a cgroup v2 directory of our own, else none."""
    if systemd_is_init(systemd_runtime, init_comm) and shutil.which("systemd-run") is not None:
        return SystemdScope()
    root = cgroup2_root(mountinfo)
    consequence = "VMMs stay in the controller's cgroup and stop when a service manager stops it"
    if root is None:
        return NoCgroup(f"no cgroup v2 hierarchy is mounted (none in {mountinfo}): {consequence}")
    if not os.access(root, os.W_OK):
        return NoCgroup(f"the cgroup v2 hierarchy at {root} is not writable (read-only or not root): "
                        f"{consequence}")
    return OwnCgroup(root)
