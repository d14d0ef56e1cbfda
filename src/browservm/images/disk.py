"""Per-VM writable disks: sparse copies of one small, empty ext4 template.

Every VM boots the same golden image, attached read-only; what it writes
goes to its own disk, which the guest lays over the golden root with
overlayfs (guest/files/overlay-init). This host filesystem has no reflinks,
so a copy of the golden image would cost its full size per VM. Instead each
VM gets a copy of an empty filesystem, formatted once per size, and the copy
moves only the extents that hold data (SEEK_DATA/SEEK_HOLE): a few MiB and a
few milliseconds, whatever the size of the golden image.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from browservm.errors import CommandFailed, ImageBuildError
from browservm.progress import Progress, cache_dir, exclusive
from browservm.runner import CommandRunner

DEFAULT_SIZE_MIB = 4096
_SCHEME = 1  # bump when the mkfs options change
_CHUNK = 64 * 2**20


class DiskTemplates:
    def __init__(self, runner: CommandRunner, progress: Progress, cache: Path | None = None) -> None:
        self._runner = runner
        self._progress = progress
        self._cache = cache or cache_dir("disks")

    def template(self, size_mib: int = DEFAULT_SIZE_MIB) -> Path:
        """The empty ext4 template of this size, formatted on first use."""
        if not 64 <= size_mib <= 1024 * 1024:
            raise ImageBuildError("disk size", f"{size_mib} MiB is outside 64 MiB .. 1 TiB")
        path = self._cache / f"overlay-{size_mib}M-v{_SCHEME}.ext4"
        with exclusive(self._cache / "templates.lock", self._progress, "disk template"):
            if path.exists():
                return path
            partial = path.with_suffix(".partial")
            partial.unlink(missing_ok=True)
            # No journal (a VM's disk dies with the VM), and inode tables left unzeroed, so the
            # template stays sparse; overlay-init mounts with noinit_itable so the guest does not zero them.
            argv = ["mkfs.ext4", "-q", "-F", "-L", "browservm-vm", "-m", "0", "-O", "^has_journal",
                    "-E", "lazy_itable_init=1,nodiscard", str(partial), f"{size_mib}M"]
            try:
                self._runner.output(argv)
            except CommandFailed as exc:
                partial.unlink(missing_ok=True)
                raise ImageBuildError("disk template", str(exc)) from exc
            partial.chmod(0o444)
            os.replace(partial, path)
            self._progress.stage("disk", f"template {path} ({allocated_bytes(path) / 2**20:.1f} MiB used)")
        return path


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def clone_sparse(source: Path, target: Path) -> int:
    """Copy `source` to a new file `target`, holes included; returns the bytes allocated."""
    size = os.stat(source).st_size
    src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(src)
        raise
    try:
        os.ftruncate(dst, size)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole is left
                    break
                raise
            end = os.lseek(src, start, os.SEEK_HOLE)
            while start < end:
                start += _copy_range(src, dst, start, min(end - start, _CHUNK), source)
            offset = end
    except BaseException:
        os.close(dst)
        target.unlink(missing_ok=True)
        raise
    finally:
        os.close(src)
    os.close(dst)
    return allocated_bytes(target)


def _copy_range(src: int, dst: int, offset: int, length: int, source: Path) -> int:
    """Copy up to `length` bytes at `offset`; the bytes copied.

    copy_file_range refuses to cross file systems (EXDEV) on current kernels, and the image
    cache and the state directory are often on different ones: then read and write instead.
    """
    try:
        copied = os.copy_file_range(src, dst, length, offset, offset)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        data = os.pread(src, min(length, 2**20), offset)
        copied = os.pwrite(dst, data, offset) if data else 0
    if copied == 0:
        raise OSError(errno.EIO, f"short copy from {source} at {offset}")
    return copied
