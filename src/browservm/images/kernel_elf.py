"""An ELF vmlinux, read straight from its bytes: the checks and facts `kernel inspect` needs.

Firecracker on x86_64 loads an ELF64 executable for x86_64 by its program
headers, and enters it through the PVH entry point when the image has one: an
ELF note of owner "Xen" and type 18 (XEN_ELFNOTE_PHYS32_ENTRY).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from browservm.errors import KernelImageError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_NOTE = 4
SHT_NOBITS = 8
XEN_ELFNOTE_PHYS32_ENTRY = 18

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")  # Elf64_Phdr
_SECTION_HEADER = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type
# linux_banner (init/version-timestamp.c): "Linux version <release> (<user>@<host>) (<compiler>) <version>\n".
_BANNER = re.compile(rb"Linux version (\d[^\n\x00]*)")


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    size: int


@dataclass(frozen=True)
class ElfNote:
    owner: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfFile:
    """A checked ELF64 x86_64 executable. `size` is how many leading bytes of `data` the ELF covers:
    a vmlinux unpacked from a bzImage is followed by its relocation table, which is not part of it."""

    data: bytes = field(repr=False)
    segments: tuple[Segment, ...]
    size: int

    @classmethod
    def parse(cls, data: bytes, path: str) -> ElfFile:
        if len(data) < _HEADER.size:
            raise KernelImageError(path, f"truncated: {len(data)} bytes, shorter than an ELF64 header "
                                         f"({_HEADER.size} bytes)")
        (ident, e_type, machine, _version, _entry, phoff, shoff, _flags, _ehsize, phentsize, phnum, shentsize,
         shnum, _shstrndx) = _HEADER.unpack_from(data)
        if ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
            raise KernelImageError(path, "an ELF file, but not 64-bit little-endian: not an x86_64 vmlinux")
        if machine != EM_X86_64:
            raise KernelImageError(path, f"an ELF file for machine {machine}, not x86_64 ({EM_X86_64})")
        if e_type != ET_EXEC:
            raise KernelImageError(path, f"an ELF file of type {e_type}, not an executable (2): not a vmlinux")

        ends = [_HEADER.size, _within(data, path, "the program header table", phoff, phentsize * phnum)]
        segments = []
        for index in range(phnum):
            p_type, _flags, offset, _vaddr, _paddr, filesz, _memsz, _align = _PROGRAM_HEADER.unpack_from(
                data, phoff + index * phentsize)
            ends.append(_within(data, path, f"segment {index}", offset, filesz))
            segments.append(Segment(p_type, offset, filesz))
        if shnum:
            ends.append(_within(data, path, "the section header table", shoff, shentsize * shnum))
            for index in range(shnum):
                _name, sh_type, _flags, _addr, offset, size, *_rest = _SECTION_HEADER.unpack_from(
                    data, shoff + index * shentsize)
                if sh_type != SHT_NOBITS:
                    ends.append(_within(data, path, f"section {index}", offset, size))
        return cls(data, tuple(segments), max(ends))

    def notes(self) -> list[ElfNote]:
        found: list[ElfNote] = []
        for segment in self.segments:
            if segment.type == PT_NOTE:
                found.extend(_notes(self.data[segment.offset:segment.offset + segment.size]))
        return found

    @property
    def has_pvh_entry(self) -> bool:
        return any(note.owner == "Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY for note in self.notes())

    @property
    def image(self) -> bytes:
        """The ELF alone, without what follows it."""
        return self.data[:self.size]


def _within(data: bytes, path: str, what: str, offset: int, size: int) -> int:
    end = offset + size
    if end > len(data):
        raise KernelImageError(path, f"truncated: {what} ends at byte {end}, the file has {len(data)} bytes")
    return end


def _notes(blob: bytes) -> list[ElfNote]:
    notes: list[ElfNote] = []
    position = 0
    while position + _NOTE_HEADER.size <= len(blob):
        namesz, descsz, note_type = _NOTE_HEADER.unpack_from(blob, position)
        name_at = position + _NOTE_HEADER.size
        desc_at = name_at + _align4(namesz)
        position = desc_at + _align4(descsz)
        if position > len(blob):
            break  # a damaged note: what came before it still counts
        owner = blob[name_at:name_at + namesz].rstrip(b"\x00").decode(errors="replace")
        notes.append(ElfNote(owner, note_type, blob[desc_at:desc_at + descsz]))
    return notes


def _align4(size: int) -> int:
    return (size + 3) & ~3


def linux_banner(data: bytes) -> str | None:
    """The "Linux version ..." line of a vmlinux, without its prefix.

    A kernel holds two: a placeholder from init/version.c and the real one from
    init/version-timestamp.c, which carries the build number ("#1"); prefer that.
    """
    banners = [match[1].decode(errors="replace") for match in _BANNER.finditer(data)]
    numbered = [banner for banner in banners if re.search(r" #\d+ ", banner)]
    return (numbered or banners or [None])[0]
