"""Test-only copies of a built rootfs image with some of its files replaced.

Some faults can only be made inside a guest (a desktop part that never starts, a test-only
systemd unit); the production image and its build must not learn about them. A test derives
its own image instead: a sparse copy of the built one (`disk.clone_sparse`, the copy every VM's
overlay disk is made with: only the extents that hold data, so a 1-3 GB image costs its few
hundred MiB of data and under a second), then e2fsprogs' `debugfs -w` replaces files inside the
copy: no mount, no loop device, nothing on the host changes but the copy.

    config = json.loads(read_guest_file(image.path, "/etc/browservm/desktop.json"))
    derive_image(image.path, tmp_path / "rootfs.ext4",
                 {"/etc/browservm/desktop.json": GuestFile(json.dumps(config).encode())})

The cached image (0444, its manifest beside it) is only ever read. debugfs exits 0 whatever
happens, so every step is judged by what it prints, and each written file is read back.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from browservm.images.disk import clone_sparse

_TIMEOUT_S = 60.0
_BANNER = re.compile(r"debugfs \d+\.\d+")  # "debugfs 1.47.0 (5-Feb-2023)", on stderr
_REGULAR_FILE = 0o100000  # S_IFREG: debugfs's `sif mode` sets the whole i_mode, type bits included


class DerivedImageError(Exception):
    pass


@dataclass(frozen=True)
class GuestFile:
    """A regular file's new content in the image, with its permission bits and owner."""

    content: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


def read_guest_file(image: Path, path: str) -> bytes:
    """The bytes of `path` inside `image` (debugfs read-only: the image is not opened for writing)."""
    _check_path(path)
    return _debugfs(image, ["-R", f"cat {path}"], f"reading {path}")


def derive_image(source: Path, destination: Path, files: Mapping[str, GuestFile],
                 directories: Iterable[str] = ()) -> Path:
    """A sparse copy of `source` at `destination` (a new file) with `files` (guest path -> file) written
    into it, replacing what was there. Each file's directory must exist in the image or be one of
    `directories`, which are made first, in the order given, where missing (root's, 0755: a parent
    before its child; a drop-in directory such as /etc/systemd/system/multi-user.target.d, say).
    The copy ends read-only (0444), as the cached image is, since a VM must never write to its golden image."""
    directories = list(directories)
    for path in [*directories, *files]:
        _check_path(path)
    clone_sparse(source, destination)  # O_EXCL: never overwrites anything, the cache least of all
    try:
        with tempfile.TemporaryDirectory(prefix="derived-image-") as scratch:
            script = [f"mkdir {path}" for path in directories if not _exists(destination, path)]
            for index, (path, file) in enumerate(files.items()):
                local = Path(scratch, str(index))
                local.write_bytes(file.content)
                if _exists(destination, path):
                    script.append(f"rm {path}")  # `write` refuses to replace a file
                script += [f"write {local} {path}", f"sif {path} mode 0{_REGULAR_FILE | file.mode:o}",
                           f"sif {path} uid {file.uid}", f"sif {path} gid {file.gid}"]
            commands = Path(scratch, "commands")
            commands.write_text("\n".join(script) + "\n")
            _debugfs(destination, ["-w", "-f", str(commands)], "changing files")
        for path in directories:
            if "Type: directory" not in _debugfs(destination, ["-R", f"stat {path}"], f"checking {path}").decode():
                raise DerivedImageError(f"{path} in {destination} is not a directory")
        for path, file in files.items():
            _verify(destination, path, file)
        os.chmod(destination, 0o444)
    except BaseException:
        destination.unlink(missing_ok=True)
        raise
    return destination


def _check_path(path: str) -> None:
    # debugfs splits its command lines on whitespace; ".." would leave the intended directory.
    if not path.startswith("/") or any(c.isspace() or c in "\"'\\" for c in path) or ".." in path.split("/"):
        raise DerivedImageError(f"{path!r}: give an absolute guest path without spaces, quotes or ..")


def _exists(image: Path, path: str) -> bool:
    try:
        _debugfs(image, ["-R", f"stat {path}"], f"looking up {path}")
    except DerivedImageError as exc:
        if "File not found" in str(exc):
            return False
        raise
    return True


def _verify(image: Path, path: str, file: GuestFile) -> None:
    if read_guest_file(image, path) != file.content:
        raise DerivedImageError(f"{path} in {image} does not hold the bytes written")
    stat = _debugfs(image, ["-R", f"stat {path}"], f"checking {path}").decode()
    header = stat.split("File ACL")[0].split()  # "Inode: N Type: regular Mode: 0755 Flags: ... User: 0 Group: 0"
    mode, uid, gid = (header[header.index(word) + 1] for word in ("Mode:", "User:", "Group:"))
    if (int(mode, 8), int(uid), int(gid)) != (file.mode, file.uid, file.gid):
        raise DerivedImageError(f"{path} in {image} has mode {mode} uid {uid} gid {gid}, not "
                                f"{file.mode:04o} {file.uid} {file.gid}")


def _debugfs(image: Path, args: list[str], what: str) -> bytes:
    """debugfs's standard output; DerivedImageError when it printed any error (it exits 0 anyway)."""
    try:
        done = subprocess.run(["debugfs", *args, str(image)], capture_output=True, timeout=_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise DerivedImageError("debugfs is not installed (apt-get install e2fsprogs)") from None
    # stderr carries a version banner, then one line per failed command.
    errors = [line for line in done.stderr.decode(errors="replace").splitlines()
              if line.strip() and not _BANNER.match(line)]
    if done.returncode != 0 or errors:
        raise DerivedImageError(f"debugfs {what} in {image}: {'; '.join(errors) or f'exit {done.returncode}'}")
    return done.stdout
