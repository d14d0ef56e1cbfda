"""VMM processes: started in the VM network's namespace, outside the controller's process tree
and control group so they outlive however the controller stops, and recognised afterwards by
their recorded identity, never by a command-line word.

Identity: the PID *and* its start time (a recycled PID is never mistaken for, or killed as,
one of ours), plus where the process stands: a VMM binary whose working directory is its VM's
directory (spawn puts it there), or a process whose root is its VM's jail (the jailer chroots
Firecracker). A `grep firecracker` or an operator's shell in a VM directory is neither.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import select
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from browservm.errors import VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.vmm.placement import Placement, ResourceLimits

# Executable names (prefixes: release builds are called e.g. firecracker-v1.7.0-x86_64). The jailer
# is there because it *becomes* Firecracker: until it chroots and execs, it is a VMM being born.
# systemd-run is not: it execs the VMM the moment its scope exists.
VMM_EXECUTABLES = ("qemu-system-", "firecracker", "jailer")
_NOT_HERE = (errno.ENOENT, errno.ENOTDIR)
_DELETED = " (deleted)"  # what the kernel appends to a link whose target was removed or replaced
_HANDOVER_TIMEOUT_S = 30.0  # systemd-run waits for systemd over D-Bus: slow on a loaded host

_TICKS = os.sysconf("SC_CLK_TCK")
# A VMM's whole environment. Nothing of the controller's: under systemd the controller's holds
# BROWSERVM_API_KEY and BROWSERVM_VAULT_KEY, and a guest that escaped into its VMM would read them
# in /proc/self/environ. A fixed PATH for what a VMM itself runs (the jailer execs Firecracker by
# path; QEMU runs nothing), and the C locale so its messages in the VM's log read the same everywhere.
VMM_ENVIRONMENT: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                                   "LC_ALL": "C"}


@dataclass(frozen=True)
class VmmProcess:
    pid: int
    start_time: int  # clock ticks after boot, field 22 of /proc/PID/stat

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 first), or None when there is no
    such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()  # the name may contain spaces and parentheses


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None when there is no such process."""
    fields = _stat_fields(pid)
    return None if fields is None else (fields[0], int(fields[19]))


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def cpu_seconds(process: VmmProcess) -> float | None:
    """CPU time the process has used (all its threads, user and system); None once it is gone (or the
    PID is another process's)."""
    fields = _stat_fields(process.pid)
    if fields is None or int(fields[19]) != process.start_time:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS


# --- spawn -------------------------------------------------------------------------------------

def spawn(argv: Sequence[str], log: Path, netns: NetworkNamespace, vm_id: str, *, directory: Path,
          placement: Placement, rlimits: Sequence[tuple[int, int]] = (),
          limits: ResourceLimits | None = None, pass_fds: Sequence[int] = ()) -> VmmProcess:
    """Start a VMM that is not the caller's child, in the VM's cgroup, namespace and directory.

    Double fork: the intermediate child calls setsid, forks the VMM-to-be, reports its PID and
    exits, so the VMM's parent is init (or the nearest subreaper), not the controller, and killing
    the controller's process tree does not reach it. Before exec the VMM joins the VM's cgroup
    (placement), enters `directory` (part of its identity, see is_vmm_of) and waits until the
    caller has read its start time, so the identity recorded is the one of the process that
    execs. `limits` go to the VM's cgroup (placement); `rlimits` ((resource, value) pairs) are set,
    soft and hard, before exec; `pass_fds` stay open in the VMM under the same numbers. Its
    environment is VMM_ENVIRONMENT, nothing of the caller's. Anything
    that fails before or at exec comes back through a close-on-exec pipe as step and errno, the
    way subprocess reports exec failures.
    """
    wrapped = placement.wrap(argv, vm_id, limits)
    cgroup_procs = placement.prepare(vm_id, limits)
    try:
        vmm = _spawn(wrapped, log, netns, vm_id, directory=directory, cgroup_procs=cgroup_procs, rlimits=rlimits,
                     pass_fds=pass_fds)
        if list(wrapped) != list(argv):
            _wait_for_handover(vmm, wrapped[0], argv[0], log, vm_id)
        return vmm
    except BaseException:
        # Nothing runs in it; a cgroup that cannot go now is left to the manager's own release.
        with contextlib.suppress(VmmError):
            placement.release(vm_id)
        raise


def _wait_for_handover(vmm: VmmProcess, launcher: str, program: str, log: Path, vm_id: str, *,
                       timeout: float = _HANDOVER_TIMEOUT_S) -> None:
    """Wait until `launcher` (systemd-run) has exec'd the VMM in the same process.

    Until then the process is not yet recognisable as a VMM (is_vmm_of), and a launcher that
    fails (no D-Bus, a scope of that name already there) is a start failure, said here.
    """
    resolved = shutil.which(launcher)
    launcher_exe = os.path.realpath(resolved) if resolved is not None else launcher
    deadline = time.monotonic() + timeout
    while True:
        stat = _stat(vmm.pid)
        exe = _link(vmm.pid, "exe")
        if stat is None or stat[0] == "Z" or stat[1] != vmm.start_time or exe is None:
            said = _last_line(log)
            raise VmmError(vm_id, "start", f"{launcher} exited before it ran {program}"
                                           f"{': ' + said if said else ''} (see {log})")
        if exe != launcher_exe:
            return
        if time.monotonic() > deadline:
            signal_process(vmm, signal.SIGKILL)
            raise VmmError(vm_id, "start", f"{launcher} did not run {program} within {timeout:g} s")
        time.sleep(0.005)


def _last_line(log: Path) -> str:
    try:
        with log.open("rb") as text:
            text.seek(max(0, log.stat().st_size - 4096))
            lines = text.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def _candidates(program: str) -> list[bytes]:
    """Where exec looks for `program`: computed before the fork, like subprocess does."""
    if os.sep in program:
        return [os.fsencode(program)]
    return [os.fsencode(os.path.join(folder, program)) for folder in os.get_exec_path()]


@dataclass(frozen=True)
class _Child:
    """Everything the children need, made before the fork: after it they only make os calls."""

    executables: list[bytes]
    args: list[bytes]
    env: dict[bytes, bytes]
    cgroup_procs: bytes | None
    rlimits: tuple[tuple[int, int], ...]
    pass_fds: tuple[int, ...]
    directory: bytes
    stdin: int
    stdout: int
    pid_w: int
    go_r: int
    err_w: int


def _spawn(argv: Sequence[str], log: Path, netns: NetworkNamespace, vm_id: str, *, directory: Path,
           cgroup_procs: Path | None, rlimits: Sequence[tuple[int, int]],
           pass_fds: Sequence[int] = ()) -> VmmProcess:
    program = argv[0]
    try:
        # Above 2, so the dup2()s onto 0, 1 and 2 in the child cannot overwrite one another.
        out = _above_stdio(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644))
        devnull = _above_stdio(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise VmmError(vm_id, "start", f"cannot open {exc.filename}: {exc.strerror}") from exc
    pipes: list[int] = [out, devnull]
    try:
        pid_r, pid_w = _pipe(pipes)  # intermediate -> caller: the VMM's PID
        go_r, go_w = _pipe(pipes)  # caller -> VMM: identity read, exec now
        err_r, err_w = _pipe(pipes)  # VMM -> caller: step and errno; EOF at a successful exec
        child = _Child(
            executables=_candidates(program), args=[os.fsencode(arg) for arg in argv],
            env={os.fsencode(name): os.fsencode(value) for name, value in VMM_ENVIRONMENT.items()},
            cgroup_procs=None if cgroup_procs is None else os.fsencode(cgroup_procs), rlimits=tuple(rlimits),
            pass_fds=tuple(pass_fds),
            directory=os.fsencode(directory), stdin=devnull, stdout=out, pid_w=pid_w, go_r=go_r, err_w=err_w)
        with netns.entered():
            try:
                intermediate = os.fork()
            except OSError as exc:
                raise VmmError(vm_id, "start", f"cannot fork: {exc.strerror}") from exc
            if intermediate == 0:
                _intermediate(child)
        for fd in (pid_w, go_r, err_w):
            os.close(fd)
            pipes.remove(fd)
        with contextlib.suppress(ChildProcessError):  # reaped already, were SIGCHLD ignored
            os.waitpid(intermediate, 0)
        reported = _read_all(pid_r).decode()
        what, _, value = reported.partition(":")
        if what != "pid":
            reason = os.strerror(int(value)) if value.isdigit() else "it exited without a word"
            raise VmmError(vm_id, "start", f"cannot fork the VMM process: {reason}")
        pid = int(value)
        # It waits on go_r before exec, so this is the start time of the process that execs.
        ticks = start_time(pid)
        with contextlib.suppress(BrokenPipeError):  # it failed before waiting: err_r says why
            os.write(go_w, b"x")
        failure = _read_all(err_r).decode()
    finally:
        for fd in pipes:
            os.close(fd)
    if failure:
        step, _, code = failure.partition(":")
        raise VmmError(vm_id, "start", _failure_reason(step, int(code), program, directory, cgroup_procs))
    if ticks is None:
        raise VmmError(vm_id, "start", f"{program} exited at once; see {log}")
    return VmmProcess(pid, ticks)


def _above_stdio(fd: int) -> int:
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _pipe(opened: list[int]) -> tuple[int, int]:
    read, write = os.pipe()  # close-on-exec, as every descriptor Python makes
    opened += [read, write]
    return read, write


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _failure_reason(step: str, code: int, program: str, directory: Path, cgroup_procs: Path | None) -> str:
    strerror = os.strerror(code) if code else f"the child failed at {step} before exec"
    if step == "chdir":
        return f"cannot enter the VM directory {directory}: {strerror}"
    if step == "rlimit":
        return f"cannot set the VMM's resource limits: {strerror}"
    if step == "cgroup" and cgroup_procs is not None:
        return f"cannot join cgroup {cgroup_procs.parent}: {strerror}"
    return f"cannot run {program}: {strerror}"


def _intermediate(child: _Child) -> None:
    """In the first child: between fork and exec only os calls, no logging, no locks."""
    code = 1
    try:
        os.setsid()  # the VMM is not in the controller's session or process group
        try:
            vmm = os.fork()
        except OSError as exc:
            os.write(child.pid_w, b"fork:%d" % (exc.errno or 0))
        else:
            if vmm == 0:
                _vmm(child)
            os.write(child.pid_w, b"pid:%d" % vmm)
            code = 0
    finally:
        os._exit(code)


def _vmm(child: _Child) -> None:
    """In the VMM-to-be: join the cgroup, enter the directory, wait for the go, exec. Never returns."""
    step = "setup"
    try:
        os.dup2(child.stdin, 0)
        os.dup2(child.stdout, 1)
        os.dup2(child.stdout, 2)
        # Every other descriptor the controller holds stays with it.
        keep = sorted({child.go_r, child.err_w, *child.pass_fds})
        for low, high in zip([2, *keep], [*keep, os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)
        for fd in child.pass_fds:
            os.set_inheritable(fd, True)
        # Python ignores SIGPIPE and SIGXFSZ, and ignored signals stay ignored across exec.
        for signum in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        step = "rlimit"
        for which, value in child.rlimits:
            resource.setrlimit(which, (value, value))
        if child.cgroup_procs is not None:
            step = "cgroup"
            procs = os.open(child.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(procs, b"0")  # "0": the writing process itself
            finally:
                os.close(procs)
        step = "chdir"
        os.chdir(child.directory)
        step = "go"
        if os.read(child.go_r, 1) != b"x":
            os._exit(1)  # the caller is gone: no VMM nobody knows about
        step = "exec"
        error: OSError = FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        for executable in child.executables:
            try:
                os.execve(executable, child.args, child.env)  # noqa: S606  (an argument list, no shell)
            except OSError as exc:
                # Like execvp: a later PATH entry may hold it; report the first error that is
                # more than "not here".
                if error.errno in _NOT_HERE and exc.errno not in _NOT_HERE:
                    error = exc
        raise error
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.write(child.err_w, b"%s:%d" % (step.encode(), exc.errno or 0))
    except BaseException:  # anything else must still be reported, and never return into the caller
        with contextlib.suppress(OSError):
            os.write(child.err_w, b"%s:0" % step.encode())
    finally:
        os._exit(127)


# --- identity ----------------------------------------------------------------------------------

def _link(pid: int, name: str) -> str | None:
    """Where /proc/PID/<name> points, without the kernel's " (deleted)"; None if unreadable."""
    try:
        target = os.readlink(f"/proc/{pid}/{name}")
    except OSError:
        return None
    return target.removesuffix(_DELETED)


def is_vmm_executable(path: str) -> bool:
    return os.path.basename(path).startswith(VMM_EXECUTABLES)


def is_vmm_of(vmm: VmmProcess, vm_directory: Path, jail_root: Path | None = None) -> bool:
    """Whether `vmm` (PID and start time) is alive and is the VMM of the VM in `vm_directory`.

    It is if it runs a VMM binary with the VM's directory as its working directory, or if its
    root is `jail_root`, the chroot the jailer made for this VM (firecracker.jail_root).
    """
    if not alive(vmm):
        return False
    if jail_root is not None and _link(vmm.pid, "root") == os.path.realpath(jail_root):
        return True
    exe = _link(vmm.pid, "exe")
    return (exe is not None and is_vmm_executable(exe)
            and _link(vmm.pid, "cwd") == os.path.realpath(vm_directory))


def owned_vmms(vm_root: Path, jail_base: Path | None = None) -> dict[VmmProcess, str]:
    """Every running VMM of a VM of this state directory, with its VM id.

    A VMM binary whose working directory is a directory right under `vm_root` (the VM id is its
    name), or a process whose root is `<jail_base>/<exec name>/<vm id>/root`. Processes of
    another state directory, and anything that is not a VMM binary standing in a VM directory
    (an operator's shell, a `less console.log`), are left out.
    """
    root = Path(os.path.realpath(vm_root))
    jails = None if jail_base is None else Path(os.path.realpath(jail_base))
    found: dict[VmmProcess, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        vm_id = _vm_of_process(pid, root, jails)
        stat = _stat(pid) if vm_id is not None else None
        if vm_id is not None and stat is not None and stat[0] != "Z":
            found[VmmProcess(pid, stat[1])] = vm_id
    return found


def _vm_of_process(pid: int, vm_root: Path, jail_base: Path | None) -> str | None:
    if jail_base is not None:
        root = _link(pid, "root")
        if root is not None and root != "/":
            parts = Path(root).parts
            base = jail_base.parts
            # <jail_base>/<exec name>/<vm id>/root
            if len(parts) == len(base) + 3 and parts[:len(base)] == base and parts[-1] == "root":
                return parts[-2]
    cwd = _link(pid, "cwd")
    if cwd is None or Path(cwd).parent != vm_root:
        return None
    exe = _link(pid, "exe")
    return Path(cwd).name if exe is not None and is_vmm_executable(exe) else None


# --- life and death ----------------------------------------------------------------------------

def alive(process: VmmProcess) -> bool:
    stat = _stat(process.pid)
    if stat is None or stat[1] != process.start_time:
        return False
    if stat[0] == "Z":
        _reap(process.pid)
        return False
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):  # not our child: init reaps it
        os.waitpid(pid, os.WNOHANG)


def wait_exit(process: VmmProcess, timeout: float) -> bool:
    """Wait until the process has exited; False if it still runs at the deadline."""
    if not alive(process):
        return True
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return True
    try:
        if not alive(process):  # it could have gone, and the PID been reused, before pidfd_open
            return True
        readable, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if readable:
        _reap(process.pid)
    return bool(readable)


def signal_process(process: VmmProcess, signum: signal.Signals) -> bool:
    """Send `signum` if the process is still ours; False if it was already gone.

    Through a pidfd, so the signal cannot reach another process that got the PID meanwhile.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        return False
    try:
        if not alive(process):
            return False
        signal.pidfd_send_signal(pidfd, signum)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
