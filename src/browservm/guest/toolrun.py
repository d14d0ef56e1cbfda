"""browservm-toolrun: runs a login tool on a pseudo-terminal of its own, for the agent.

The agent starts it inside the desktop's terminal window as the desktop user:

    browservm-toolrun --log L --status S --pids P [--mkdir DIR]... -- COMMAND...

It makes each `--mkdir` directory (mode 0700: the tools' config directories, which some refuse to
create themselves), writes the files the provider's entry asks for (`BROWSERVM_TOOL_FILES` in its
environment: a JSON object {absolute path under $HOME: text}, written 0600 as the desktop user, the
variable itself kept from the tool; Gemini CLI's settings are one), writes "RUNNER_PID TOOL_PID" to
P (both lead process groups of their own: the agent kills those groups), starts COMMAND on a new
pseudo-terminal (tools draw for a terminal and read keys from it), and copies what the tool prints
to the window and to L, and what the person types to the tool. L is kept under 1 MiB (its last 64
KiB are kept when it grows past that). When the tool ends, its exit status goes to S as
{"exit_status": N} (128 + the signal's number when a signal ended it), written whole by rename; when
the files cannot be written the tool does not start, L says why and S holds 2. Stdlib-only: it runs
in the guest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import os
import pty
import select
import signal
import sys
import termios
import tty
from collections.abc import Iterator, Sequence
from pathlib import Path

LOG_LIMIT = 1024 * 1024
LOG_KEEP = 64 * 1024
# Files a provider needs before its tool starts, from the catalog (oauth/catalog.py `files`), carried in the
# environment so the agent's contract (command, env, ...) stays as it is.
FILES_ENV = "BROWSERVM_TOOL_FILES"


class BadFiles(Exception):
    pass


def write_files(spec: str, home: Path) -> list[Path]:
    """Write each {path: text} of `spec` (JSON) under `home`, mode 0600, replacing what was there."""
    try:
        files = json.loads(spec)
    except ValueError:
        raise BadFiles(f"{FILES_ENV} is not JSON") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise BadFiles(f"{FILES_ENV} is not an object of texts")
    written = []
    for name, text in files.items():
        path = Path(name)
        if not path.is_absolute() or os.path.normpath(name) != name or not path.is_relative_to(home) or path == home:
            raise BadFiles(f"{name[:200]!r} is not a normalised path under {home}")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # No link followed: the desktop user's own home, but a file of theirs is written, never one it points at.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, text.encode())
        finally:
            os.close(fd)
        written.append(path)
    return written


class Log:
    """An append-only file whose size stays bounded; the newest bytes are the ones kept."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self._size = 0
        self._tail = bytearray()

    def write(self, data: bytes) -> None:
        self._tail += data
        del self._tail[:-LOG_KEEP]
        if self._size + len(data) > LOG_LIMIT:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            data, self._size = bytes(self._tail), 0
        os.write(self._fd, data)
        self._size += len(data)

    def close(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


def _copy_window_size(source: int, target: int) -> None:
    with contextlib.suppress(OSError):
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
        fcntl.ioctl(target, termios.TIOCSWINSZ, size)


@contextlib.contextmanager
def _raw(fd: int) -> Iterator[None]:
    """Keys go to the tool's own terminal unprocessed; ours is restored afterwards."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


def _write_status(path: Path, status: int) -> None:
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(json.dumps({"exit_status": status}))
    os.replace(temporary, path)


def run(command: Sequence[str], log_path: Path, status_path: Path, pids_path: Path,
        directories: Sequence[Path] = ()) -> int:
    for directory in directories:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    log = Log(log_path)
    files = os.environ.pop(FILES_ENV, None)  # popped: the tool inherits this environment
    try:
        write_files(files or "{}", Path.home())
    except (BadFiles, OSError) as exc:
        # The tool never starts; its log and status say why, as for a command that cannot run.
        message = f"browservm-toolrun: cannot write the tool's files: {exc}\n".encode()
        log.write(message)
        with contextlib.suppress(OSError):
            _write_all(2, message)
        log.close()
        _write_status(status_path, 2)
        return 2
    pid, master = pty.fork()
    if pid == 0:  # the tool: a session of its own on the new terminal, so its group is its pid
        try:
            os.execvp(command[0], list(command))  # noqa: S606 - an argument list, no shell
        except OSError as exc:
            sys.stderr.write(f"browservm-toolrun: cannot run {command[0]}: {exc.strerror}\n")
        os._exit(127)
    pids_path.write_text(f"{os.getpid()} {pid}\n")
    interactive = os.isatty(0)
    if interactive:
        _copy_window_size(0, master)
        signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(0, master))
    exited = os.pidfd_open(pid)
    try:
        with _raw(0):
            _relay(master, exited, log, interactive)
    finally:
        os.close(exited)
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    status = 128 - status if status < 0 else status
    log.close()
    os.close(master)
    _write_status(status_path, status)
    return status


def _relay(master: int, exited: int, log: Log, interactive: bool) -> None:
    """Copy until the tool ends (`exited`, its pidfd) or its terminal closes, then what it left unread."""
    sources = [master, exited, 0] if interactive else [master, exited]
    while True:
        try:
            readable, _, _ = select.select(sources, [], [])
        except InterruptedError:
            continue
        if exited in readable:
            os.set_blocking(master, False)  # a child the tool left behind may hold the terminal open
            while _copy(master, log):
                pass
            return
        if master in readable and not _copy(master, log):
            return
        if 0 in readable:
            keys = os.read(0, 4096)
            if not keys:
                sources.remove(0)
            else:
                _write_all(master, keys)


def _copy(master: int, log: Log) -> bool:
    """One read from the tool's terminal to the log and the window; False at its end or when none is waiting."""
    try:
        data = os.read(master, 65536)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno == errno.EIO:  # Linux says EIO once no process holds the other side
            return False
        raise
    if not data:
        return False
    log.write(data)
    with contextlib.suppress(OSError):  # the window may be gone; the log still matters
        _write_all(1, data)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-toolrun", description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--pids", type=Path, required=True)
    parser.add_argument("--mkdir", type=Path, action="append", default=[])
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    return run(args.command, args.log, args.status, args.pids, args.mkdir)


if __name__ == "__main__":
    sys.exit(main())
