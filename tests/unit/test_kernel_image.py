import bz2
import gzip
import lzma
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from browservm.errors import CommandFailed, KernelImageError
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_elf import ElfFile, linux_banner
from browservm.images.kernel_image import BZIMAGE, ELF, extract_vmlinux, read_kernel_image
from browservm.runner import CommandRunner
from tests.unit.kernel_samples import BANNER, PVH_NOTE, SETUP_VERSION, make_bzimage, make_elf, with_size

RUNNER = CommandRunner()
DECOMPRESSOR = PayloadDecompressor(RUNNER)
VMLINUX = make_elf(BANNER + b"\x00" + bytes(4096), (PVH_NOTE,))


def _write(tmp_path: Path, data: bytes, name: str = "kernel") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _tool(argv: list[str]) -> Callable[[bytes], bytes]:
    return lambda data: RUNNER.output(argv, input=data)


# How the kernel's own Makefiles compress the payload, one entry per compressor.
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, 9),
    "xz": lambda data: with_size(lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), data),
    "lzma": lambda data: with_size(lzma.compress(data, format=lzma.FORMAT_ALONE), data),
    "bzip2": lambda data: with_size(bz2.compress(data, 9), data),
    "zstd": lambda data: with_size(_tool(["zstd", "-q", "-19", "-c"])(data), data),
    "lz4": lambda data: with_size(_tool(["lz4", "-q", "-l", "-9", "-c"])(data), data),
}


def test_an_elf_vmlinux_is_read_as_it_is(tmp_path: Path) -> None:
    image = read_kernel_image(_write(tmp_path, VMLINUX), DECOMPRESSOR)
    assert (image.format, image.release, image.compression, image.setup) == (ELF, "6.1.99-sample", None, None)
    assert image.banner == BANNER.decode().removeprefix("Linux version ").rstrip("\n")
    assert image.vmlinux.has_pvh_entry
    assert image.vmlinux.image == VMLINUX


@pytest.mark.parametrize("compression", sorted(COMPRESSORS))
def test_a_bzimage_is_unpacked_whatever_compressed_it(tmp_path: Path, compression: str) -> None:
    relocs = b"\x01\x02\x03\x04" * 8  # x86 appends its relocation table to the vmlinux before compressing
    path = _write(tmp_path, make_bzimage(COMPRESSORS[compression](VMLINUX + relocs)))
    image = read_kernel_image(path, DECOMPRESSOR)
    assert (image.format, image.compression, image.release) == (BZIMAGE, compression, "6.1.99-sample")
    assert image.setup is not None
    assert (image.setup.kernel_version, image.setup.protocol_text) == (SETUP_VERSION, "2.15")
    assert image.vmlinux.image == VMLINUX  # the relocation table is not part of the ELF


def test_extracting_writes_the_elf_and_reads_it_back(tmp_path: Path) -> None:
    image = read_kernel_image(_write(tmp_path, make_bzimage(COMPRESSORS["xz"](VMLINUX))), DECOMPRESSOR)
    out = tmp_path / "vmlinux"
    written = extract_vmlinux(image, out, DECOMPRESSOR)
    assert (written.format, written.release) == (ELF, image.release)
    assert out.read_bytes() == VMLINUX
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_extracting_into_a_missing_directory_names_the_output(tmp_path: Path) -> None:
    image = read_kernel_image(_write(tmp_path, VMLINUX), DECOMPRESSOR)
    with pytest.raises(KernelImageError, match="cannot write the extracted vmlinux") as caught:
        extract_vmlinux(image, tmp_path / "missing" / "vmlinux", DECOMPRESSOR)
    assert caught.value.path == str(tmp_path / "missing" / "vmlinux")


BZIMAGE_GZ = make_bzimage(gzip.compress(VMLINUX))


NOT_USABLE = [
    (b"", "empty file"),
    (b"this is a shell script, not a kernel\n" * 20, "not a kernel: neither an ELF vmlinux"),
    (b"MZ" + bytes(100), "truncated: 102 bytes, starts like a bzImage"),
    (VMLINUX[:40], "truncated: 40 bytes, shorter than an ELF64 header"),
    (VMLINUX[:100], "truncated: the program header table ends at byte 176"),
    (VMLINUX[:-10], f"truncated: segment 0 ends at byte {len(VMLINUX)}, the file has {len(VMLINUX) - 10} bytes"),
    (make_elf(BANNER, e_type=3), "type 3, not an executable"),
    (make_elf(BANNER, machine=183), "for machine 183, not x86_64"),
    (make_elf(BANNER, elf_class=1), "not 64-bit little-endian"),
    (make_elf(b"no banner here"), "without a 'Linux version' banner: not a Linux kernel"),
    (BZIMAGE_GZ[:0x240], "shorter than a bzImage setup header"),
    (BZIMAGE_GZ[:-100], "truncated: the setup header puts the compressed kernel at bytes"),
    (make_bzimage(gzip.compress(VMLINUX), protocol=0x0206), "boot protocol 2.06 predates 2.08"),
    (make_bzimage(b"\x00\x11\x22\x33 not compressed"), "the magic of no compressor"),
    (make_bzimage(gzip.compress(VMLINUX)[:100]), "the gzip payload ends before its stream does: truncated"),
    (make_bzimage(b"\x1f\x8b" + bytes(64)), "the gzip payload does not unpack"),
    (make_bzimage(with_size(lzma.compress(VMLINUX), VMLINUX + b"x")), "unpacks to .* bytes, the image says"),
    (make_bzimage(with_size(b"\x28\xb5\x2f\xfd" + bytes(32), b"")), "the zstd payload does not unpack"),
    (make_bzimage(gzip.compress(b"#!/bin/sh\n")), "unpacks, but not to an ELF vmlinux"),
]


@pytest.mark.parametrize(("data", "reason"), NOT_USABLE, ids=[reason[:40] for _, reason in NOT_USABLE])
def test_a_file_that_is_not_a_usable_kernel_says_why(tmp_path: Path, data: bytes, reason: str) -> None:
    path = _write(tmp_path, data)
    with pytest.raises(KernelImageError, match=reason) as caught:
        read_kernel_image(path, DECOMPRESSOR)
    assert caught.value.path.startswith(str(path))


def test_a_missing_path_and_a_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(KernelImageError, match="no such file"):
        read_kernel_image(tmp_path / "nothing", DECOMPRESSOR)
    with pytest.raises(KernelImageError, match="a directory"):
        read_kernel_image(tmp_path, DECOMPRESSOR)


def test_a_missing_unpacker_is_an_install_problem_not_a_bad_image(tmp_path: Path) -> None:
    no_tools = PayloadDecompressor(CommandRunner(env={"PATH": str(tmp_path)}))
    path = _write(tmp_path, make_bzimage(COMPRESSORS["lz4"](VMLINUX)))
    with pytest.raises(CommandFailed, match=r"program .lz4. not found: scripts/install\.sh installs it"):
        read_kernel_image(path, no_tools)


def test_notes_are_read_and_a_kernel_without_the_pvh_note_has_no_pvh_entry() -> None:
    other = ("Xen", 6, b"linux\x00")
    with_pvh = ElfFile.parse(make_elf(BANNER, (other, PVH_NOTE)), "k")
    assert [(n.owner, n.type) for n in with_pvh.notes()] == [("Xen", 6), ("Xen", 18)]
    assert with_pvh.notes()[1].desc == struct.pack("<I", 0x1000000)
    assert not ElfFile.parse(make_elf(BANNER, (other, ("GNU", 18, b"abcd"))), "k").has_pvh_entry


def test_a_damaged_note_keeps_the_notes_before_it() -> None:
    runs_past_the_segment = struct.pack("<III", 4, 1000, 18) + b"Xen\x00"
    elf = ElfFile.parse(make_elf(BANNER, (("Xen", 6, b"linux\x00"),), raw_notes=runs_past_the_segment), "k")
    assert [(n.owner, n.type) for n in elf.notes()] == [("Xen", 6)]
    assert not elf.has_pvh_entry


def test_the_numbered_banner_wins_over_the_placeholder() -> None:
    data = (b"Linux version 6.1.0-1-amd64 (a@b) (gcc) # SMP PREEMPT\n\x00"
            b"Linux version 6.1.0-1-amd64 (a@b) (gcc) #1 SMP PREEMPT Debian\n\x00")
    assert linux_banner(data) == "6.1.0-1-amd64 (a@b) (gcc) #1 SMP PREEMPT Debian"
    assert linux_banner(b"Linux version 5.10.0 (x) (y) Tue\n") == "5.10.0 (x) (y) Tue"
    assert linux_banner(b"Linux version %s\n") is None
