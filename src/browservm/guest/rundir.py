"""A login's run directory, as the agent gives it to browservm-toolrun and reads it back.

toolrun (toolrun.py) writes the tool's output to OUTPUT_LOG, its exit status to STATUS and the
process groups it leads to PIDS; the terminal window's own errors go to TERMINAL_LOG. Each is read
with O_NOFOLLOW and a bound: the directory belongs to the desktop user. Stdlib-only: it runs in
the guest.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

OUTPUT_LOG = "output.log"
STATUS = "status.json"
PIDS = "pids"
TERMINAL_LOG = "terminal.log"
OUTPUT_LINES = 40
OUTPUT_LINE_CHARS = 400
OUTPUT_TAIL_BYTES = 64 * 1024
_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[@-Z\\-_])")


def output_lines(directory: Path) -> list[str]:
    """The last lines the tool printed, as a person saw them: escape sequences out, overwritten text gone."""
    try:
        data = _tail_bytes(directory / OUTPUT_LOG, OUTPUT_TAIL_BYTES)
    except OSError:
        return []
    lines = []
    for raw in _ANSI.sub("", data.decode(errors="replace")).split("\n"):
        line = raw.rstrip("\r").rsplit("\r", 1)[-1]  # what a carriage return left visible
        line = "".join(c for c in line if c.isprintable())
        if line.strip():
            lines.append(line[:OUTPUT_LINE_CHARS])
    return lines[-OUTPUT_LINES:]


def exit_status(directory: Path) -> int | None:
    """The tool's exit status as toolrun recorded it, or None before it ended."""
    try:
        data = json.loads(_read_limited(directory / STATUS, 4096))
    except (OSError, ValueError):
        return None
    status = data.get("exit_status")
    return status if isinstance(status, int) else None


def pids(directory: Path) -> list[int]:
    """The process groups toolrun leads (its own and the tool's), as it recorded them."""
    try:
        words = _read_limited(directory / PIDS, 256).split()
    except OSError:
        return []
    return [int(w) for w in words if w.isdigit() and int(w) > 1]


def _read_limited(path: Path, limit: int) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(fd, limit).decode(errors="replace")
    finally:
        os.close(fd)


def _tail_bytes(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - limit), os.SEEK_SET)
        return os.read(fd, limit)
    finally:
        os.close(fd)


def tail_text(path: Path) -> str:
    try:
        return _tail_bytes(path, 400).decode(errors="replace").strip() or "(it said nothing)"
    except OSError:
        return "(no output)"
