"""Kernel configurations: the `.config` format, and the copy a kernel can carry of it.

A `.config` (and a config fragment) has one option per line: `CONFIG_X=y`,
`CONFIG_X=m`, `CONFIG_X="text"`, `CONFIG_X=42`, or `# CONFIG_X is not set`.
An option that is missing altogether is off too (Kconfig leaves out options
whose dependencies are not met), so `value()` answers "n" for both.

With CONFIG_IKCONFIG=y the kernel image holds its `.config`, gzip-compressed,
between the markers `IKCFG_ST` and `IKCFG_ED` (kernel/configs.c).
"""

from __future__ import annotations

import gzip
import re
import zlib
from dataclasses import dataclass

from browservm.errors import KernelImageError

_SET = re.compile(r"(CONFIG_[A-Za-z0-9_]+)=(.*)")
_NOT_SET = re.compile(r"# (CONFIG_[A-Za-z0-9_]+) is not set")

IKCONFIG_START = b"IKCFG_ST"
IKCONFIG_END = b"IKCFG_ED"


@dataclass(frozen=True)
class KernelConfig:
    """Option name (with its CONFIG_ prefix) → value as written: "y", "m", "n", '"text"', "42"."""

    options: dict[str, str]

    @classmethod
    def parse(cls, text: str) -> KernelConfig:
        options: dict[str, str] = {}
        for raw in text.splitlines():
            line = raw.strip()
            if match := _SET.fullmatch(line):
                options[match[1]] = match[2]
            elif match := _NOT_SET.fullmatch(line):
                options[match[1]] = "n"
        return cls(options)

    def value(self, name: str) -> str:
        return self.options.get(_prefixed(name), "n")

    def merged(self, overrides: KernelConfig) -> KernelConfig:
        return KernelConfig({**self.options, **overrides.options})


def _prefixed(name: str) -> str:
    return name if name.startswith("CONFIG_") else f"CONFIG_{name}"


@dataclass(frozen=True)
class Mismatch:
    option: str
    wanted: str
    got: str

    def __str__(self) -> str:
        return f"{self.option}: wanted {self.wanted}, got {self.got}"


def mismatches(wanted: KernelConfig, actual: KernelConfig) -> list[Mismatch]:
    """Each option of `wanted` whose value `actual` does not have, in the order `wanted` lists them."""
    return [Mismatch(name, value, actual.value(name))
            for name, value in wanted.options.items() if actual.value(name) != value]


def embedded_config(image: bytes, path: str) -> KernelConfig | None:
    """The config an image carries (CONFIG_IKCONFIG=y), or None when it carries none.

    A start marker without a readable config after it means a damaged image: KernelImageError.
    """
    start = image.find(IKCONFIG_START)
    if start < 0:
        return None
    start += len(IKCONFIG_START)
    end = image.find(IKCONFIG_END, start)
    if end < 0:
        raise KernelImageError(path, f"embedded config: 'IKCFG_ST' at byte {start} has no 'IKCFG_ED' after it")
    try:
        text = gzip.decompress(image[start:end]).decode()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise KernelImageError(path, f"embedded config: the gzip data between 'IKCFG_ST' and 'IKCFG_ED' "
                               f"is unreadable ({exc})") from exc
    return KernelConfig.parse(text)
