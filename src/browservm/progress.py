"""Progress of long work, and the locks and cache directory that long work shares."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO


def cache_dir(kind: str) -> Path:
    """Built artefacts are rebuildable, so they live in the user's cache, not in the state directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "browservm" / kind


class Progress:
    """Stage lines with the time since the work started, on stderr so --json output stays clean."""

    def __init__(self, stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def stage(self, name: str, detail: str = "") -> None:
        print(f"  [{self.elapsed:6.1f}s] {name:<13} {detail}".rstrip(), file=self._stream, flush=True)

    def note(self, message: str) -> None:
        print(message, file=self._stream, flush=True)


@contextmanager
def exclusive(path: Path, progress: Progress, what: str) -> Iterator[None]:
    """Hold an exclusive lock on `path`; say so when someone else holds it, then wait for them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.note(f"{what}: waiting for another process that holds {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
