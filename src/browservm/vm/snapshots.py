"""Snapshots of a booted desktop, one per set of inputs, kept in the state directory.

A snapshot is what a VM looked like once its browser was on screen: its VMM's whole state (RAM
and devices) and its writable disk. It is only ever used with the very inputs it was made with:
the kernel (by content), the golden image (by identity: images are read-only files named by
their content), the VMM binary and device model, the vCPUs and memory. Change any of them and
the key changes: a new snapshot is made, the old one is never used. So the golden image never
changes under a snapshot.

    <state dir>/snapshots/<key>/state          the VMM's state (0600)
                               /overlay.ext4   the VM's disk at that moment
                               /manifest.json  the inputs, when it was made, from which VM
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from browservm.vmdir import OVERLAY

MANIFEST = "manifest.json"
STATE = "state"


@dataclass(frozen=True)
class Snapshot:
    key: str
    directory: Path
    made_at: float
    made_from: str  # the VM it was taken of
    inputs: dict[str, str]

    @property
    def state(self) -> Path:
        return self.directory / STATE

    @property
    def overlay(self) -> Path:
        return self.directory / OVERLAY  # named as in a VM's directory

    @property
    def age(self) -> float:
        return time.time() - self.made_at


def file_identity(path: Path) -> str:
    """A read-only file as a snapshot input: where it is and which file it is (inode, size, time)."""
    st = path.stat()
    return f"{path.resolve()} {st.st_dev}:{st.st_ino} {st.st_size} {st.st_mtime_ns}"


class Snapshots:
    """The snapshots of one state directory. Blocking (file I/O): async callers use a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._kernel_digests: dict[str, str] = {}

    def key(self, kernel: Path, rootfs: Path, vcpus: int, mem_mib: int,
            vmm: dict[str, str]) -> tuple[str, dict[str, str]]:
        """The key of a snapshot made with these inputs, and the inputs as the manifest records them."""
        kernel_id = file_identity(kernel)
        if kernel_id not in self._kernel_digests:  # kernels are small; hashing one settles "same kernel"
            self._kernel_digests[kernel_id] = hashlib.sha256(kernel.read_bytes()).hexdigest()
        inputs = {"kernel": self._kernel_digests[kernel_id], "rootfs": file_identity(rootfs),
                  "vcpus": str(vcpus), "mem_mib": str(mem_mib), **vmm}
        digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        return digest, inputs

    def get(self, key: str) -> Snapshot | None:
        directory = self.root / key
        try:
            manifest: dict[str, Any] = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            return None
        return Snapshot(key=key, directory=directory, made_at=manifest["made_at"], made_from=manifest["made_from"],
                        inputs=manifest["inputs"])

    def staging(self, key: str) -> Path:
        """A fresh directory to make a snapshot in; `publish` makes it the snapshot."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        staged = self.root / f".{key}.{os.getpid()}.{time.monotonic_ns()}"
        staged.mkdir(mode=0o700)
        return staged

    def publish(self, staged: Path, key: str, inputs: dict[str, str], made_from: str) -> Snapshot:
        manifest = {"key": key, "made_at": time.time(), "made_from": made_from, "inputs": inputs}
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        final = self.root / key
        try:
            os.rename(staged, final)  # atomic; fails if another maker published first: theirs stays
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
        snapshot = self.get(key)
        assert snapshot is not None
        return snapshot

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def all(self) -> list[Snapshot]:
        if not self.root.is_dir():
            return []
        found = [self.get(p.name) for p in self.root.iterdir() if not p.name.startswith(".")]
        return [s for s in found if s is not None]
