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


class Placement(Protocol):
    name: str  # "systemd", "cgroup" or "none"
    reason: str  # why this placement, in a sentence (diagnostics)

    def wrap(self, argv: Sequence[str], vm_id: str) -> list[str]:
        """The command that runs `argv` in this VM's place (the same PID runs the VMM in the end)."""
        ...

    def prepare(self, vm_id: str) -> Path | None:
        """Make the VM's cgroup if the VMM has to join it itself: its `cgroup.procs`, else None."""
        ...

    def release(self, vm_id: str) -> None:
        """Remove the VM's cgroup or scope, ending whatever still runs in it. Idempotent."""
        ...


def systemd_run_argv(argv: Sequence[str], vm_id: str, slice_name: str = SLICE,
                     systemd_run: str = "systemd-run") -> list[str]:
    """`argv` wrapped to run in the transient scope `browservm-<vm_id>.scope` (a value)."""
    validate_vm_id(vm_id)
    # --collect: the unit is forgotten when it ends, even if the VMM failed, so the same name
    # never blocks a later VM and nothing piles up in `systemctl --failed`.
    return [systemd_run, "--scope", "--quiet", "--collect", f"--unit={scope_unit(vm_id)}",
            f"--slice={slice_name}", f"--description=browservm VM {vm_id}", "--", *argv]


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
        self.reason = f"each VMM runs in a cgroup of its own under {self.base}"

    def cgroup(self, vm_id: str) -> Path:
        return self.base / validate_vm_id(vm_id)

    def wrap(self, argv: Sequence[str], vm_id: str) -> list[str]:
        return list(argv)

    def prepare(self, vm_id: str) -> Path:
        cgroup = self.cgroup(vm_id)
        try:
            cgroup.mkdir(parents=True, exist_ok=True)
            holding = _cgroup_pids(cgroup)
        except OSError as exc:
            raise VmmError(vm_id, "place", f"cannot make cgroup {cgroup}: {exc.strerror}") from exc
        if holding:
            # Its release would kill them: refuse rather than share a cgroup with another VM.
            raise VmmError(vm_id, "place", f"cgroup {cgroup} already holds processes {holding}: "
                                           "another VM with this id is running")
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

    def wrap(self, argv: Sequence[str], vm_id: str) -> list[str]:
        # systemd-run would only say so after it made the scope, in the VMM's log: say it now.
        if shutil.which(argv[0]) is None:
            raise VmmError(vm_id, "start", f"cannot run {argv[0]}: {os.strerror(errno.ENOENT)}")
        return systemd_run_argv(argv, vm_id, self.slice, self._systemd_run)

    def prepare(self, vm_id: str) -> Path | None:
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

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def wrap(self, argv: Sequence[str], vm_id: str) -> list[str]:
        return list(argv)

    def prepare(self, vm_id: str) -> Path | None:
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
