"""The state directory's secret files (api.key, viewer-signing.key, vault.key), read and made so that
no other local user can choose what the controller reads as a key, or what it changes.

The controller runs as root. A state directory another user owns or can write (or one below a
directory they can write) lets that user put a symbolic link where a key file goes: root then read
the link's target as its key and chmodded it 0600 (issue 18). So:

- the state directory and every existing directory above it must be owned by root or by us and
  writable by no one else; above it, a sticky directory (/tmp) may be shared, since others cannot
  replace what is ours inside it (the build cache's rule, progress.check_trusted); the state
  directory itself may not be writable by anyone else, sticky or not;
- a key file is opened with O_NOFOLLOW (a link is refused, not followed) and must be a regular file
  of ours with one name (a hard link to another file is refused); its mode is corrected through the
  open descriptor, never by path.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from browservm.errors import StateError
from browservm.trust import first_untrusted


def check_state_dir(path: Path, uid: int | None = None) -> None:
    """StateError unless `path` (a state directory, which may not exist yet) and every existing
    directory above it are safe from other users (see the module's docstring)."""
    try:
        found = first_untrusted(path, uid, sticky_leaf=False)
    except OSError as exc:
        raise StateError(str(path), f"cannot check {exc.filename}: {exc.strerror}") from exc
    if found is None:
        return
    if found.owner is not None:
        raise StateError(str(path), f"{found.directory} is owned by uid {found.owner}, another user: the state "
                                    "directory and those above it must be root's or ours")
    if found.mode is not None:
        raise StateError(str(path), f"{found.directory} is writable by other users (mode {found.mode:04o}): "
                                    "they could replace the controller's keys and database")
    raise StateError(str(path), f"{found.directory} is not a directory")


def read_or_create(path: Path, make: str, what: str) -> str:
    """The text of the secret file `path`, or `make` + newline written there first (mode 0600,
    created exclusively) when there is none. `what` names the secret in errors ("the API key").

    Blocking. Checks the state directory first (check_state_dir); never follows a link.
    """
    check_state_dir(path.parent)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return _read(path, what)
        try:
            os.write(fd, make.encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return make + "\n"
    except OSError as exc:
        raise StateError(str(path), f"cannot read or make {what}: {exc.strerror}") from exc


def read_existing(path: Path, what: str) -> str:
    """The text of the secret file `path`, which must exist (FileNotFoundError, or another OSError,
    when it cannot be opened); as read_or_create reads it: the directory checked, no link followed."""
    check_state_dir(path.parent)
    return _read(path, what)


def _read(path: Path, what: str) -> str:
    try:
        # O_NONBLOCK: a FIFO put there would otherwise hold the open for ever (it is refused below).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateError(str(path), f"is a symbolic link: {what} is never read through one") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(str(path), f"is not a regular file: {what} is refused")
        if st.st_uid != os.geteuid():
            raise StateError(str(path), f"is owned by uid {st.st_uid}, not by us: {what} is refused")
        if st.st_nlink != 1:
            raise StateError(str(path), f"has {st.st_nlink} names (hard links): {what} is refused")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # whatever it was: a key others can read is a key given away
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 64 * 1024:
                raise StateError(str(path), f"is over 64 KiB: not {what}")
        return b"".join(chunks).decode(errors="replace")
    finally:
        os.close(fd)
