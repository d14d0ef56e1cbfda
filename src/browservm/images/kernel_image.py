"""Any kernel file, read into one shape: its format, its ELF vmlinux, its version.

An ELF vmlinux is used as it is; a bzImage is unpacked to the vmlinux inside
it, so every later question (version, embedded config, evidence, PVH note) is
asked of a vmlinux either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from browservm.errors import KernelImageError
from browservm.images.kernel_bzimage import SETUP_HEADER_END, PayloadDecompressor, SetupHeader, is_bzimage
from browservm.images.kernel_elf import ELF_MAGIC, ElfFile, linux_banner

ELF = "elf"
BZIMAGE = "bzImage"


@dataclass(frozen=True)
class KernelImage:
    path: str
    format: str  # ELF or BZIMAGE
    vmlinux: ElfFile  # the file itself, or the vmlinux a bzImage carries
    banner: str  # "<release> (<user>@<host>) (<compiler>) <version>", after "Linux version "
    setup: SetupHeader | None = None  # bzImage only
    compression: str | None = None  # bzImage only

    @property
    def release(self) -> str:
        return self.banner.split(" ", 1)[0]


def read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KernelImageError(str(path), "no such file") from None
    except IsADirectoryError:
        raise KernelImageError(str(path), "a directory, not a kernel file") from None
    except OSError as exc:
        raise KernelImageError(str(path), f"cannot be read: {exc.strerror}") from None
    if not data:
        raise KernelImageError(str(path), "empty file (0 bytes)")
    return data


def read_kernel_image(path: Path, decompressor: PayloadDecompressor) -> KernelImage:
    data = read_bytes(path)
    name = str(path)
    if data.startswith(ELF_MAGIC):
        vmlinux = ElfFile.parse(data, name)
        return KernelImage(name, ELF, vmlinux, _banner(vmlinux, name))
    if is_bzimage(data):
        setup = SetupHeader.parse(data, name)
        compression, unpacked = decompressor.decompress(setup.payload(data), name)
        if not unpacked.startswith(ELF_MAGIC):
            raise KernelImageError(name, f"the {compression.name} payload unpacks, but not to an ELF vmlinux")
        vmlinux = ElfFile.parse(unpacked, f"{name} (unpacked vmlinux)")
        return KernelImage(name, BZIMAGE, vmlinux, _banner(vmlinux, name), setup, compression.name)
    if data.startswith(b"MZ") and len(data) < SETUP_HEADER_END:
        # x86 bzImages with an EFI stub start with "MZ"; this one ends before its setup header.
        raise KernelImageError(name, f"truncated: {len(data)} bytes, starts like a bzImage ('MZ') but ends "
                                     f"before the setup header ({SETUP_HEADER_END} bytes)")
    raise KernelImageError(name, f"not a kernel: neither an ELF vmlinux (no '\\x7fELF' magic) nor a bzImage "
                                 f"(no 'HdrS' setup header at byte 0x202); it starts with {data[:8].hex(' ')}")


def extract_vmlinux(image: KernelImage, out: Path, decompressor: PayloadDecompressor) -> KernelImage:
    """Write the ELF vmlinux of `image` to `out`, then read it back: it must be an ELF of the same release."""
    partial = out.with_name(f".{out.name}.partial")
    try:
        partial.write_bytes(image.vmlinux.image)
        partial.replace(out)  # whole or not at all: a VMM must never boot half a kernel
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise KernelImageError(str(out), f"cannot write the extracted vmlinux: {exc.strerror}") from None
    written = read_kernel_image(out, decompressor)
    if written.format != ELF or written.release != image.release:
        raise KernelImageError(str(out), f"the extracted file reads back as {written.format} {written.release}, "
                                         f"not as an ELF vmlinux of {image.release}")
    return written


def _banner(vmlinux: ElfFile, path: str) -> str:
    banner = linux_banner(vmlinux.image)
    if banner is None:
        raise KernelImageError(path, "an x86_64 ELF executable without a 'Linux version' banner: not a Linux kernel")
    return banner
