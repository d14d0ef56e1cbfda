"""Waiting for a directory to change, woken by the kernel (inotify) instead of a timer."""

from __future__ import annotations

import asyncio
import ctypes
import os
import select
import time
from pathlib import Path
from types import TracebackType

_libc = ctypes.CDLL(None, use_errno=True)
_IN_MODIFY = 0x2
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200


class DirectoryWatch:
    """`async with DirectoryWatch(d) as watch: await watch.changed(timeout)` - True when a file in d changed."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._fd = -1
        self._event = asyncio.Event()

    async def __aenter__(self) -> DirectoryWatch:
        self._fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = _IN_MODIFY | _IN_CREATE | _IN_MOVED_TO | _IN_DELETE
        if _libc.inotify_add_watch(self._fd, os.fsencode(self._directory), mask) < 0:
            code = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(code, f"cannot watch {self._directory}: {os.strerror(code)}")
        asyncio.get_running_loop().add_reader(self._fd, self._event.set)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, error: BaseException | None,
                        traceback: TracebackType | None) -> None:
        asyncio.get_running_loop().remove_reader(self._fd)
        os.close(self._fd)

    async def changed(self, timeout: float | None = None) -> bool:
        # asyncio.timeout, not wait_for: in Python 3.11 wait_for can swallow a cancel that arrives as
        # the event is set, and a loop around changed() (the service's store watch) would never stop.
        try:
            async with asyncio.timeout(timeout):
                await self._event.wait()
        except TimeoutError:
            return False
        self._event.clear()
        try:
            while os.read(self._fd, 65536):
                pass
        except BlockingIOError:
            pass
        return True


def wait_for_file(path: Path, timeout: float) -> bool:
    """Block until `path` exists (woken by its directory's inotify events), at most `timeout` s."""
    fd = _libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1 failed")
    try:
        if _libc.inotify_add_watch(fd, os.fsencode(path.parent), _IN_CREATE | _IN_MOVED_TO) < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"cannot watch {path.parent}: {os.strerror(code)}")
        deadline = time.monotonic() + timeout
        while not path.exists():  # looked at after the watch is set: no creation slips between
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if select.select([fd], [], [], remaining)[0]:
                os.read(fd, 65536)
        return True
    finally:
        os.close(fd)
