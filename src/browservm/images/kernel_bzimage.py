"""A bzImage: the x86 boot setup header, and the compressed vmlinux inside it.

The layout is Documentation/x86/boot.rst: the real-mode setup code fills
`setup_sects` + 1 sectors of 512 bytes, and the setup header at offset 0x1F1
says where the compressed vmlinux is (`payload_offset`/`payload_length`,
protocol 2.08 and later), relative to the protected-mode code that follows.
Which compressor made it shows in its first bytes. Every compressor but gzip
is followed by the uncompressed size as 4 little-endian bytes (size_append in
scripts/Makefile.lib), which we check the result against.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

from browservm.errors import CommandFailed, KernelImageError
from browservm.runner import CommandRunner

SETUP_MAGIC = b"HdrS"
SETUP_MAGIC_AT = 0x202
_BOOT_FLAG_AT = 0x1FE
_SETUP_SECTS_AT = 0x1F1
_VERSION_AT = 0x206
_KERNEL_VERSION_AT = 0x20E
_PAYLOAD_AT = 0x248
SETUP_HEADER_END = 0x250
PAYLOAD_PROTOCOL = 0x0208  # first protocol with payload_offset and payload_length
MAX_VMLINUX = 1 << 30  # a decompression bomb, not a kernel, would be larger


def is_bzimage(data: bytes) -> bool:
    return data[SETUP_MAGIC_AT:SETUP_MAGIC_AT + len(SETUP_MAGIC)] == SETUP_MAGIC


@dataclass(frozen=True)
class SetupHeader:
    protocol: int  # 0x020f is 2.15
    setup_sects: int
    kernel_version: str  # "<release> (<user>@<host>) <version>", or "" when absent
    payload_offset: int
    payload_length: int

    @property
    def protocol_text(self) -> str:
        return f"{self.protocol >> 8}.{self.protocol & 0xFF:02d}"

    @property
    def payload_start(self) -> int:
        return (self.setup_sects + 1) * 512 + self.payload_offset

    @classmethod
    def parse(cls, data: bytes, path: str) -> SetupHeader:
        if len(data) < SETUP_HEADER_END:
            raise KernelImageError(path, f"truncated: {len(data)} bytes, shorter than a bzImage setup header "
                                         f"({SETUP_HEADER_END} bytes)")
        if data[_BOOT_FLAG_AT:_BOOT_FLAG_AT + 2] != b"\x55\xaa":
            raise KernelImageError(path, "has a 'HdrS' setup header but no 0x55AA boot flag: not a bzImage")
        (protocol,) = struct.unpack_from("<H", data, _VERSION_AT)
        if protocol < PAYLOAD_PROTOCOL:
            raise KernelImageError(path, f"boot protocol {protocol >> 8}.{protocol & 0xFF:02d} predates 2.08: "
                                         "the setup header does not say where the compressed kernel is")
        setup_sects = data[_SETUP_SECTS_AT] or 4  # 0 means 4, for compatibility with very old loaders
        (version_pointer,) = struct.unpack_from("<H", data, _KERNEL_VERSION_AT)
        payload_offset, payload_length = struct.unpack_from("<II", data, _PAYLOAD_AT)
        header = cls(protocol, setup_sects, _c_string(data, version_pointer + 0x200) if version_pointer else "",
                     payload_offset, payload_length)
        end = header.payload_start + payload_length
        if payload_length == 0 or end > len(data):
            raise KernelImageError(path, f"truncated: the setup header puts the compressed kernel at bytes "
                                         f"{header.payload_start}-{end}, the file has {len(data)} bytes")
        return header

    def payload(self, data: bytes) -> bytes:
        return data[self.payload_start:self.payload_start + self.payload_length]


def _c_string(data: bytes, offset: int) -> str:
    end = data.find(b"\x00", offset)
    return data[offset:end if end >= 0 else len(data)].decode(errors="replace")


@dataclass(frozen=True)
class Compression:
    name: str
    magic: bytes
    size_trailer: bool = True


COMPRESSIONS = (
    Compression("gzip", b"\x1f\x8b", size_trailer=False),
    Compression("xz", b"\xfd7zXZ\x00"),
    Compression("zstd", b"\x28\xb5\x2f\xfd"),
    Compression("lzma", b"\x5d\x00\x00"),
    Compression("lz4", b"\x02\x21\x4c\x18"),  # the legacy frame format the kernel uses (lz4 -l)
    Compression("bzip2", b"BZh"),
    Compression("lzo", b"\x89LZO\x00\r\n\x1a\n"),
)


def compression_of(payload: bytes) -> Compression | None:
    return next((c for c in COMPRESSIONS if payload.startswith(c.magic)), None)


class _StreamDecompressor(Protocol):
    """What zlib, lzma and bz2 decompressor objects have in common."""

    @property
    def eof(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int = ..., /) -> bytes: ...


class PayloadDecompressor:
    """Unpacks a bzImage payload: Python's own codecs where it has them, Debian's zstd and lz4 where not."""

    def __init__(self, runner: CommandRunner) -> None:
        self._runner = runner

    def decompress(self, payload: bytes, path: str) -> tuple[Compression, bytes]:
        compression = compression_of(payload)
        if compression is None:
            raise KernelImageError(path, f"the compressed kernel starts with {payload[:6].hex(' ')}, the magic of "
                                         "no compressor the kernel uses (gzip, xz, zstd, lzma, lz4, bzip2, lzo)")
        expected: int | None = None
        if compression.size_trailer and len(payload) > 4:
            (expected,) = struct.unpack("<I", payload[-4:])
            payload = payload[:-4]
        data = self._decompress(compression, payload, path)
        if expected is not None and len(data) != expected:
            raise KernelImageError(path, f"the {compression.name} payload unpacks to {len(data)} bytes, "
                                         f"the image says {expected}: damaged or truncated")
        return compression, data

    def _decompress(self, compression: Compression, payload: bytes, path: str) -> bytes:
        python_codecs: dict[str, _StreamDecompressor] = {
            "gzip": zlib.decompressobj(wbits=31),
            "xz": lzma.LZMADecompressor(format=lzma.FORMAT_XZ),
            "lzma": lzma.LZMADecompressor(format=lzma.FORMAT_ALONE),
            "bzip2": bz2.BZ2Decompressor(),
        }
        tools = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"]}
        if compression.name in python_codecs:
            return _python_decompress(python_codecs[compression.name], compression.name, payload, path)
        if compression.name in tools:
            try:
                return self._runner.output(tools[compression.name], input=payload)
            except CommandFailed as exc:
                if exc.returncode is None:  # the tool is missing: an install problem, not a bad image
                    raise
                raise KernelImageError(path, f"the {compression.name} payload does not unpack: "
                                             f"{exc.detail or exc.reason}") from exc
        raise KernelImageError(path, f"the kernel is {compression.name}-compressed, which browservm does not unpack")


def _python_decompress(codec: _StreamDecompressor, name: str, payload: bytes, path: str) -> bytes:
    try:
        data = codec.decompress(payload, MAX_VMLINUX + 1)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
        raise KernelImageError(path, f"the {name} payload does not unpack: {exc}") from exc
    if len(data) > MAX_VMLINUX:
        raise KernelImageError(path, f"the {name} payload unpacks to more than {MAX_VMLINUX} bytes: not a kernel")
    if not codec.eof:
        raise KernelImageError(path, f"the {name} payload ends before its stream does: truncated")
    return data
