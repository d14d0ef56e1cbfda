"""What a guest would boot with: does its kernel apply `ip=` (through `kernel inspect`), and does its
image carry browservm's own network configurator?

The image is read with `debugfs` (e2fsprogs) in its default read-only mode: no loop mount, no
write, one process with a deadline. Blocking: run these in a thread.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from browservm.errors import BrowserVMError
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_image import read_kernel_image
from browservm.images.kernel_inspect import KernelReport, inspect_kernel
from browservm.runner import CommandRunner

CONFIGURATOR = "/usr/lib/browservm/bin/browservm-net"
DEBUGFS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class KernelFacts:
    path: str
    report: KernelReport | None
    error: str | None

    @property
    def ip_pnp(self) -> str | None:
        return None if self.report is None else self.report.value("IP_PNP")


def inspect_kernel_file(path: Path) -> KernelFacts:
    if not path.is_file():
        return KernelFacts(str(path), None, "no such file")
    try:
        report = inspect_kernel(read_kernel_image(path, PayloadDecompressor(CommandRunner())))
    except (BrowserVMError, OSError) as exc:
        return KernelFacts(str(path), None, str(exc))
    return KernelFacts(str(path), report, None)


@dataclass(frozen=True)
class ImageFacts:
    path: str
    has_configurator: bool | None  # None: could not tell
    detail: str


def inspect_image(path: Path, member: str = CONFIGURATOR) -> ImageFacts:
    """Whether the ext4 image holds `member` as a regular file."""
    if not path.is_file():
        return ImageFacts(str(path), None, "no such file")
    try:
        proc = subprocess.run(["debugfs", "-R", f"stat {member}", str(path)], capture_output=True, text=True,
                              timeout=DEBUGFS_TIMEOUT_S, check=False)
    except FileNotFoundError:
        return ImageFacts(str(path), None, "debugfs is not installed (apt-get install e2fsprogs)")
    except subprocess.TimeoutExpired:
        return ImageFacts(str(path), None, f"debugfs did not finish within {DEBUGFS_TIMEOUT_S:g} s")
    # debugfs exits 0 either way: the answer is in what it prints.
    if "Type: regular" in proc.stdout:
        return ImageFacts(str(path), True, f"{member} is in the image (debugfs: a regular file)")
    if "File not found" in proc.stderr:
        said = proc.stderr.strip().splitlines()[-1]
        return ImageFacts(str(path), False, f"{member} is not in the image (debugfs: {said})")
    problem = (proc.stderr.strip().splitlines() or [f"debugfs exited {proc.returncode}"])[-1]
    return ImageFacts(str(path), None, f"debugfs cannot read it: {problem}")
