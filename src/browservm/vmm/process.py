"""VMM processes: started in the VM network's namespace, in a session of their own so they
outlive a controller restart, and recognised afterwards by PID *and* start time, so a
recycled PID is never mistaken for (or killed as) one of ours.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from browservm.errors import VmmError
from browservm.hostnet.netns import NetworkNamespace


@dataclass(frozen=True)
class VmmProcess:
    pid: int
    start_time: int  # clock ticks after boot, field 22 of /proc/PID/stat

    def to_json(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time) of a process, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may contain spaces and parentheses
    return fields[0], int(fields[19])


def start_time(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat[1]


def spawn(argv: Sequence[str], log: Path, netns: NetworkNamespace, vm_id: str) -> VmmProcess:
    with log.open("ab") as out, netns.entered():
        try:
            child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True, close_fds=True)
        except OSError as exc:
            raise VmmError(vm_id, "start", f"cannot run {argv[0]}: {exc.strerror}") from exc
    stat = _stat(child.pid)
    if stat is None:
        raise VmmError(vm_id, "start", f"{argv[0]} exited at once; see {log}")
    return VmmProcess(child.pid, stat[1])


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
