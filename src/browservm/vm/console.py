"""A VM's serial console log, read as it grows.

The VMM writes the guest's console into a file; `ConsoleLog` reads new lines
as they arrive, woken by inotify rather than by a timer, and remembers every
line so a failure report can show the last ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from browservm.inotify import DirectoryWatch


class ConsoleLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[str] = []
        self._offset = 0
        self._partial = b""

    def read_new(self) -> list[str]:
        """Complete lines written since the last call."""
        try:
            with self.path.open("rb") as stream:
                stream.seek(self._offset)
                data = stream.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        chunks = (self._partial + data).split(b"\n")
        self._partial = chunks.pop()
        new = [chunk.decode(errors="replace").rstrip("\r") for chunk in chunks]
        self.lines += new
        return new

    def tail(self, count: int = 20) -> list[str]:
        self.read_new()
        return self.lines[-count:]

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
                if remaining <= 0 or not await watch.changed(remaining):
                    return None
