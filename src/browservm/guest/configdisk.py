"""The per-VM config disk: how the host hands a guest its secrets without the kernel command line.

The kernel prints its command line on the console, and operators read consoles; so secrets (the
OAuth agent's key, the desktop's VNC password) go on a small read-only virtio disk of their own,
the VM's third (`/dev/vdc`), which works the same under QEMU and Firecracker and needs nothing
from the guest kernel. Its layout is one block:

    b"browservm-config 1\\n" + JSON document + zero padding to SIZE bytes

The host writes it (mode 0600, in the VM's own directory) and the guest reads it; both sides use
this module. Stdlib-only: the guest image carries it.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path
from typing import Any

MAGIC = b"browservm-config 1\n"
SIZE = 4096  # one page; a virtio-blk disk is a whole number of 512-byte sectors
GUEST_DEVICE = Path("/dev/vdc")


class ConfigDiskError(Exception):
    pass


def encode(document: dict[str, Any]) -> bytes:
    body = MAGIC + json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    if len(body) > SIZE:
        raise ConfigDiskError(f"the VM's configuration is {len(body)} bytes, more than the disk's {SIZE}")
    return body + b"\0" * (SIZE - len(body))


def decode(block: bytes) -> dict[str, Any]:
    if not block.startswith(MAGIC):
        raise ConfigDiskError("not a browservm config disk (no magic line)")
    text = block[len(MAGIC):].split(b"\0", 1)[0]
    try:
        document = json.loads(text)
    except ValueError as exc:
        raise ConfigDiskError(f"unreadable configuration: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigDiskError("the configuration is not a JSON object")
    return document


def write(path: Path, document: dict[str, Any]) -> None:
    """Create the disk image (never replacing one), readable by its owner only."""
    data = encode(document)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read(path: Path = GUEST_DEVICE) -> dict[str, Any]:
    with path.open("rb") as stream:
        return decode(stream.read(SIZE))


def read_uncached(path: Path = GUEST_DEVICE) -> dict[str, Any]:
    """The disk as the host last wrote it, not as the guest's page cache remembers it (the host
    rewrites it under a running VM: a restore's identity, a claimed VM's new agent key)."""
    with mmap.mmap(-1, SIZE) as buffer:  # page-aligned, as O_DIRECT wants
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # a file system without O_DIRECT (tests): no cache to skip
        try:
            count = os.preadv(fd, [buffer], 0)
        finally:
            os.close(fd)
        if count != SIZE:
            raise ConfigDiskError(f"{path}: read {count} bytes of the config disk's {SIZE}")
        return decode(bytes(buffer))


def rewrite(path: Path, document: dict[str, Any]) -> None:
    """Replace the document in place (the same file, which a running VMM holds open as the guest's
    disk), durably: the guest reads it past its page cache (guest/identity.py)."""
    data = encode(document)
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)
