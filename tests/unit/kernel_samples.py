"""Small synthetic kernels, laid out byte by byte as the real formats are, for the parsing tests."""

from __future__ import annotations

import gzip
import struct

from browservm.images.kernel_config import IKCONFIG_END, IKCONFIG_START

BANNER = b"Linux version 6.1.99-sample (t@h) (gcc 12) #7 SMP PREEMPT_DYNAMIC Thu Jan 1 00:00:00 UTC 2026\n"
SETUP_VERSION = "6.1.99-sample (t@h) #7 SMP PREEMPT_DYNAMIC Thu Jan 1 00:00:00 UTC 2026"
# The strings inspect takes as evidence that an option is built in, one per option.
ALL_MARKERS = (b"IP-Config: Complete:\x00virtio-mmio\x00virtio-mmio-cmdline\x00virtio_net.napi_tx\x00"
               b"virtio_blk.queue_depth\x00EXT4-fs error\x00uart8250\x00ACPI: Core revision %08x\x00"
               b"PCI host bridge to bus %s\x00")
PVH_NOTE = ("Xen", 18, struct.pack("<I", 0x1000000))

PT_LOAD = 1
PT_NOTE = 4


def note(owner: str, note_type: int, desc: bytes) -> bytes:
    name = owner.encode() + b"\x00"
    return (struct.pack("<III", len(name), len(desc), note_type) + name.ljust((len(name) + 3) & ~3, b"\x00")
            + desc.ljust((len(desc) + 3) & ~3, b"\x00"))


def ikconfig(config_text: str) -> bytes:
    return IKCONFIG_START + gzip.compress(config_text.encode()) + IKCONFIG_END


def make_elf(body: bytes, notes: tuple[tuple[str, int, bytes], ...] = (), *, e_type: int = 2,
             machine: int = 62, elf_class: int = 2, raw_notes: bytes = b"") -> bytes:
    """An ELF64 executable: header, a PT_LOAD over `body` and a PT_NOTE over `notes` (then `raw_notes`)."""
    header_size, phdr_size = 64, 56
    note_blob = b"".join(note(*n) for n in notes) + raw_notes
    note_at = header_size + 2 * phdr_size
    body_at = note_at + len(note_blob)
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, 0x1000000, header_size, 0, 0,
                         header_size, phdr_size, 2, 64, 0, 0)
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, body_at, 0, 0, len(body), len(body), 4096)
    notes_header = struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_at, 0, 0, len(note_blob), len(note_blob), 4)
    return header + load + notes_header + note_blob + body


def make_bzimage(payload: bytes, *, setup_sects: int = 1, protocol: int = 0x020F,
                 version: str = SETUP_VERSION) -> bytes:
    """A bzImage around an already compressed `payload` (size trailer included where the kernel adds one)."""
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, protocol)
    version_at = 0x300  # inside the setup sectors, as the kernel puts it
    setup[version_at:version_at + len(version) + 1] = version.encode() + b"\x00"
    struct.pack_into("<H", setup, 0x20E, version_at - 0x200)
    payload_offset = 0x40  # the decompressor code sits before the payload
    struct.pack_into("<II", setup, 0x248, payload_offset, len(payload))
    return bytes(setup) + bytes(payload_offset) + payload


def with_size(compressed: bytes, original: bytes) -> bytes:
    """What scripts/Makefile.lib's size_append adds after every compressor but gzip."""
    return compressed + struct.pack("<I", len(original))
