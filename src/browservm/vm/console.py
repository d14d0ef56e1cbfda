"""A VM's serial console log, read as it grows.

The VMM writes the guest's console into a file; `ConsoleLog` reads new lines
as they arrive, woken by inotify rather than by a timer, and remembers the
recent ones so a failure report can show the last lines.

The guest writes this file: everything about it is bounded before the host
keeps it (bytes per read, characters per line, lines remembered), so a guest
that floods its console costs the controller a bounded amount of memory and
time per wake-up.

On disk, a console is capped (`cap_console`): past MAX_DISK bytes the middle of the file is
punched out (a hole, as `fallocate --punch-hole` makes), keeping its start (the boot, with the
markers the doctor reads) and its latest output; the file keeps its length, so the VMM writes on
where it was and readers skip the hole's zeros.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import os
from collections.abc import Callable
from pathlib import Path

from browservm.inotify import DirectoryWatch

READ_CHUNK = 256 * 1024  # per read: a flood is read over several wake-ups of the event loop
MAX_LINE = 4096  # characters kept of one line
MAX_LINES = 5000  # lines remembered
MAX_DISK = 8 * 2**20  # bytes a console may hold on disk
KEEP_HEAD = 1 * 2**20  # of those, the first ones: the boot
_BLOCK = 4096
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]


class ConsoleLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: collections.deque[str] = collections.deque(maxlen=MAX_LINES)
        self._offset = 0
        self._partial = b""
        self.more = False  # the last read stopped at READ_CHUNK: more is already there

    def read_new(self) -> list[str]:
        """Complete lines written since the last call (at most READ_CHUNK bytes of them)."""
        try:
            with self.path.open("rb") as stream:
                stream.seek(self._offset)
                data = stream.read(READ_CHUNK)
        except FileNotFoundError:
            return []
        self.more = len(data) == READ_CHUNK
        self._offset += len(data)
        data = data.replace(b"\0", b"")  # a hole cap_console punched (nothing a console prints)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()[:MAX_LINE]
        new = [_line(chunk) for chunk in chunks]
        self.lines.extend(new)
        return new

    def tail(self, count: int = 20) -> list[str]:
        """The last `count` lines, reading to the end of the file first (blocking: call it in a thread)."""
        self.read_new()
        while self.more:
            self.read_new()
        return list(self.lines)[-count:]

    def ends(self, head: int = KEEP_HEAD, tail: int = KEEP_HEAD) -> list[str]:
        """The lines of the file's first `head` and last `tail` bytes (all of it when it is no longer),
        at most MAX_LINES from each end: for a reader that looks once (the doctor), the boot with its
        markers and the latest output, however long the file. Not remembered. Blocking."""
        try:
            with self.path.open("rb") as stream:
                size = stream.seek(0, os.SEEK_END)
                stream.seek(0)
                if size <= head + tail:
                    return _lines(stream.read(head + tail), MAX_LINES, MAX_LINES)
                first = stream.read(head)
                stream.seek(size - tail)
                return _lines(first, MAX_LINES, 0) + _lines(stream.read(tail), 0, MAX_LINES)
        except FileNotFoundError:
            return []

    async def wait_for(self, match: Callable[[str], bool], timeout: float) -> str | None:
        """The first line (already read or still to come) that `match`es, or None at the deadline."""
        for line in self.lines:
            if match(line):
                return line
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with DirectoryWatch(self.path.parent) as watch:
            while True:
                for line in self.read_new():  # after the watch is set up: no write can slip between
                    if match(line):
                        return line
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                if self.more:
                    await asyncio.sleep(0)  # let others run between two chunks of a long console
                elif not await watch.changed(remaining):
                    return None


    async def wait_new(self, timeout: float) -> list[str]:
        """The next complete lines the guest writes (at once if some are unread), or [] after `timeout`
        seconds of silence."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with DirectoryWatch(self.path.parent) as watch:
            while True:
                new = self.read_new()  # after the watch is set up: no write can slip between
                if new:
                    return new
                remaining = deadline - loop.time()
                if remaining <= 0 or not await watch.changed(remaining):
                    return []


def _line(chunk: bytes) -> str:
    return chunk[:MAX_LINE].decode(errors="replace").rstrip("\r")


def _lines(data: bytes, first: int, last: int) -> list[str]:
    """The first `first` and the last `last` lines of `data`, split without making the ones between
    (a guest that prints only newlines makes a line of every byte)."""
    data = data.replace(b"\0", b"").removesuffix(b"\n")
    if not data:
        return []
    chunks = data.split(b"\n", first)
    if len(chunks) > first:  # more than `first` lines: the last piece is the rest, unsplit
        rest = chunks.pop()
        chunks += rest.rsplit(b"\n", last)[-last:] if last else []
    return [_line(chunk) for chunk in chunks]


def cap_console(path: Path, max_disk: int = MAX_DISK, keep_head: int = KEEP_HEAD) -> int:
    """Free what `path` holds beyond `max_disk` bytes, from its middle; the bytes freed. Blocking.

    Keeps `keep_head` bytes at the start and the latest `max_disk - keep_head` at the end.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return 0
    try:
        stat = os.fstat(fd)
        if stat.st_blocks * 512 <= max_disk:
            return 0
        start = -(-keep_head // _BLOCK) * _BLOCK
        end = -(-(stat.st_size - (max_disk - keep_head)) // _BLOCK) * _BLOCK  # rounded up: within max_disk
        if end <= start:
            return 0
        if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot free the middle of the console log: {os.strerror(code)}", str(path))
        return stat.st_blocks * 512 - os.fstat(fd).st_blocks * 512
    finally:
        os.close(fd)


def terminal_safe(line: str) -> str:
    """A console line as text a terminal shows and does not obey: the guest wrote it, and escape
    sequences in it could retitle, recolour or rewrite an operator's terminal."""
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in line)
