"""The credentials files a login waits for: watched with inotify, read and judged, and their digest.

The files are watched on the deepest directory of each path that exists, re-armed as directories
appear. Success is every file present, a regular file owned by the desktop user (not reached
through a link), at most 1 MiB, and parsing as a JSON object with every one of `required_keys`.
`credentials_digest` is the hash the `captured` marker carries and the host recomputes over what
the handover returned. Stdlib-only: it runs in the guest (the host imports the digest).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from browservm.guest.markers import PREFIX, format_marker

MAX_FILE_BYTES = 1024 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_ATTRIB = 0x2, 0x8, 0x4
_IN_MOVED_TO, _IN_CREATE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x80, 0x100, 0x400, 0x800
_WATCH_MASK = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_ATTRIB | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE_SELF | _IN_MOVE_SELF


def captured_marker(provider: str, files: int, digest: str) -> str:
    """`browservm-agent: captured provider=<name> files=<n> sha256=<hex>` (DESIGN.md's contract)."""
    return format_marker("agent", provider=provider, files=files, sha256=digest).replace(
        f"{PREFIX}agent: ", f"{PREFIX}agent: captured ", 1)


def credentials_digest(files: Mapping[str, bytes]) -> str:
    """The hash in the `captured` marker, over the credentials files as handed over.

    SHA-256 over, for each file in order of its path (Python's `sorted` of the path strings, i.e.
    by code point), the path in UTF-8, a newline, the content's length in decimal ASCII, a newline,
    then the content's bytes:

        sha256(b"".join(p.encode() + b"\\n" + str(len(d)).encode() + b"\\n" + d for p, d in sorted(files.items())))

    Lowercase hex. Path and length are in it so no two different sets of files share a hash.
    """
    digest = hashlib.sha256()
    for path, data in sorted(files.items()):
        digest.update(path.encode() + b"\n" + str(len(data)).encode() + b"\n")
        digest.update(data)
    return digest.hexdigest()


class CredentialsWatch:
    """inotify on the deepest existing directory of each credentials path, re-armed as directories appear."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = tuple(paths)
        self.problem: str | None = None
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._arm()

    def _arm(self) -> None:
        for path in self.paths:
            directory = Path(path).parent
            while True:
                existing = directory
                while not existing.is_dir() and existing != existing.parent:
                    existing = existing.parent
                if _libc.inotify_add_watch(self.fd, os.fsencode(existing), _WATCH_MASK) < 0:
                    code = ctypes.get_errno()
                    if code not in (errno.ENOENT, errno.ENOTDIR):
                        raise OSError(code, f"cannot watch {existing}: {os.strerror(code)}")
                    continue  # it went away meanwhile: look again
                # A directory made between the look and the watch sent no event to us: look again.
                if existing == directory or not _next_component(existing, directory).exists():
                    break

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def check(self, owner: int | None, required_keys: Sequence[str]) -> dict[str, bytes] | None:
        """Every file's bytes if all are present and good, else None (and `problem` says why)."""
        self._arm()
        files: dict[str, bytes] = {}
        for path in self.paths:
            data, problem = _read_credentials(path, owner, required_keys)
            if data is None:
                self.problem = problem
                return None
            files[path] = data
        self.problem = None
        return files

    def close(self) -> None:
        os.close(self.fd)


def _next_component(existing: Path, target: Path) -> Path:
    return existing / target.relative_to(existing).parts[0]


def _read_credentials(path: str, owner: int | None, required_keys: Sequence[str]) -> tuple[bytes | None, str]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, f"{path} is missing"
    except OSError as exc:
        return None, f"{path}: {exc.strerror}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return None, f"{path} is not a regular file"
        if owner is not None and info.st_uid != owner:
            return None, f"{path} is not owned by the desktop user"
        if info.st_size > MAX_FILE_BYTES:
            return None, f"{path} is larger than {MAX_FILE_BYTES} bytes"
        data = os.read(fd, MAX_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if os.path.realpath(path) != path:
        return None, f"{path} is reached through a symbolic link"
    try:
        document = json.loads(data)
    except ValueError:
        return None, f"{path} is not JSON (yet)"
    if not isinstance(document, dict):
        return None, f"{path} is not a JSON object"
    missing = [key for key in required_keys if key not in document]
    if missing:
        return None, f"{path} lacks {', '.join(missing)}"
    return data, ""
