"""Whether a path is safe from other local users: the one walk behind the build cache's check
(progress.check_trusted) and the state directory's (secretfile.check_state_dir)."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Untrusted:
    directory: Path
    owner: int | None = None  # another user's uid, when that is why
    mode: int | None = None  # a mode writable by others, when that is why (None with owner None: not a directory)

    def why(self) -> str:
        if self.owner is not None:
            return f"owned by uid {self.owner}"
        if self.mode is not None:
            return f"writable by others (mode {self.mode:04o})"
        return "not a directory"


def first_untrusted(path: Path, uid: int | None = None, *, sticky_leaf: bool = True) -> Untrusted | None:
    """The first existing directory from `path` up to / that another user could change, and why; None
    when there is none. Each must be a directory owned by `uid` (default: ours) or root and writable by
    no one else; a sticky directory (/tmp) may be shared, since others cannot replace what is ours
    inside it, except `path` itself unless `sticky_leaf`. OSError when one cannot be looked at."""
    me = os.geteuid() if uid is None else uid
    resolved = Path(os.path.realpath(path))  # a link's target is what gets used
    for directory in (resolved, *resolved.parents):
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue  # made later, by us
        if not stat.S_ISDIR(st.st_mode):
            return Untrusted(directory)
        if st.st_uid not in (0, me):
            return Untrusted(directory, owner=st.st_uid)
        shared = st.st_mode & stat.S_ISVTX and (sticky_leaf or directory != resolved)
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not shared:
            return Untrusted(directory, mode=stat.S_IMODE(st.st_mode))
    return None
