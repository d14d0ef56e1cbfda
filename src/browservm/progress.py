"""Progress of long work, and the locks and cache directory that long work shares."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from browservm.errors import BrowserVMError
from browservm.trust import first_untrusted


class UntrustedCache(BrowserVMError):
    """Root was about to use built kernels or images from a directory another user controls."""

    def __init__(self, directory: Path, reason: str) -> None:
        self.directory = directory
        self.reason = reason
        super().__init__(f"cache directory {directory}: {reason}; a local user could swap the kernel or image "
                         "VMs boot. Point XDG_CACHE_HOME at a directory only root can write")


def cache_path(kind: str) -> Path:
    """Built artefacts are rebuildable, so they live in the user's cache, not in the state directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "browservm" / kind


def cache_dir(kind: str) -> Path:
    """`cache_path(kind)`, once it is known that only we (and root) control it and every directory
    above it: what is in it is booted as VMs."""
    path = cache_path(kind)
    check_trusted(path)
    return path


def check_trusted(path: Path, uid: int | None = None) -> None:
    """Raise UntrustedCache unless every existing directory from `path` up to / is owned by `uid`
    (default: ours) or root and writable by no one else; a sticky directory (/tmp) may be shared,
    as others cannot replace what is ours inside it."""
    found = first_untrusted(path, uid)
    if found is not None:
        raise UntrustedCache(found.directory, found.why())


@dataclass(frozen=True)
class BuildStep:
    """One step of a build a person is waiting for (the controller streams these to `vm create --url`)."""

    what: str  # "the guest kernel", "the golden image (full)"
    step: int  # 1-based; equal to `total` once the build is done
    total: int
    name: str
    detail: str = ""
    log: str = ""  # where the build writes its output

    def headline(self) -> str:
        """The step without the host's commands and paths (for a viewer)."""
        if self.name == "done":
            return f"built {self.what}"
        return f"building {self.what}, step {self.step} of {self.total}: {self.name}"

    def describe(self) -> str:
        """The step with its detail (for the operator and the CLI; the build's log is `log`)."""
        text = self.headline()
        return text + (f" ({self.detail})" if self.detail and self.name != "done" else "")


class Progress:
    """Stage lines with the time since the work started, on stderr so --json output stays clean.

    A build announces its steps first (`plan`); each of its stages then also goes, numbered, to the
    observer, if there is one (`observed`).
    """

    def __init__(self, stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic,
                 observer: Callable[[BuildStep], None] | None = None) -> None:
        self._stream = stream
        self._clock = clock
        self._started = clock()
        self._observer = observer
        self._plan: tuple[str, tuple[str, ...], str] | None = None

    def observed(self, observer: Callable[[BuildStep], None]) -> Progress:
        """This progress (same stream and clock) whose builds' steps also go to `observer`."""
        progress = Progress(self._stream, self._clock, observer)
        progress._started = self._started
        return progress

    def plan(self, what: str, steps: tuple[str, ...], log: Path | None = None) -> None:
        """The steps the build of `what` will pass, in order, and its log."""
        self._plan = (what, steps, "" if log is None else str(log))

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def stage(self, name: str, detail: str = "") -> None:
        print(f"  [{self.elapsed:6.1f}s] {name:<13} {detail}".rstrip(), file=self._stream, flush=True)
        if self._observer is None or self._plan is None:
            return
        what, steps, log = self._plan
        if name == "done":
            self._plan = None
            self._observer(BuildStep(what, len(steps), len(steps), name, detail, log))
        elif name in steps:
            self._observer(BuildStep(what, steps.index(name) + 1, len(steps), name, detail, log))

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
