"""The lock held while VM ports and their set elements change and while browservm's tables are replaced."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path


class PortLock:
    """Held by every process of this state directory at once (a thread lock, then an flock): `vm
    create` processes and a `serve` each write the same sets, and a table replaced from a port list
    read a moment earlier would drop the elements of a port another process has just added."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # the flock goes with the descriptor
        self._threads.release()
