"""A flooded console log stays within its cap on disk: the start and the latest output are kept,
the VMM writes on where it was, and readers see lines, not the hole's zeros. On the real file system."""

from __future__ import annotations

import os
from pathlib import Path

from browservm.vm.console import MAX_DISK, MAX_LINE, MAX_LINES, ConsoleLog, cap_console

from .fakes import make_parts, stop_all

MiB = 2**20


def test_a_flooded_console_keeps_its_start_and_its_end_within_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    # As a VMM writes it: one descriptor, its own offset, never reopened.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"browservm-ready: service=desktop state=ready\n")
        line = b"x" * 1023 + b"\n"
        for _ in range(20 * 1024):  # 20 MiB of flood
            os.write(fd, line)
        size = os.fstat(fd).st_size
        freed = cap_console(path, max_disk=4 * MiB, keep_head=1 * MiB)
        assert freed >= 15 * MiB
        assert os.stat(path).st_blocks * 512 <= 4 * MiB
        assert os.stat(path).st_size == size  # the VMM's offset still points at the end
        os.write(fd, b"the latest line\n")
    finally:
        os.close(fd)
    console = ConsoleLog(path)
    lines = console.tail(5)
    assert lines[-1] == "the latest line"
    assert console.lines[0] == "browservm-ready: service=desktop state=ready"
    assert not any("\0" in line for line in console.lines)


def test_a_console_under_the_cap_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "console.log"
    path.write_bytes(b"boot\n" * 1000)
    assert cap_console(path, max_disk=4 * MiB) == 0
    assert path.read_bytes() == b"boot\n" * 1000
    assert cap_console(tmp_path / "absent.log") == 0


def test_the_manager_caps_every_vms_console_and_says_which(tmp_path: Path) -> None:
    parts = make_parts(tmp_path)
    try:
        manager = parts.manager()
        flooded, quiet = parts.vm_root / "vm-000000000001", parts.vm_root / "vm-000000000002"
        for directory in (flooded, quiet):
            directory.mkdir(parents=True)
        (flooded / "console.log").write_bytes(b"y" * (MAX_DISK + 4 * MiB))
        (quiet / "console.log").write_bytes(b"boot\n")
        freed = manager.cap_consoles()
        assert list(freed) == ["vm-000000000001"] and freed["vm-000000000001"] >= 4 * MiB
        assert (flooded / "console.log").stat().st_blocks * 512 <= MAX_DISK
    finally:
        stop_all(parts)


def test_a_look_at_both_ends_of_a_flooded_console_finds_the_boot_and_the_latest_line_within_bounds(
        tmp_path: Path) -> None:
    """What the doctor reads: the markers at the start survive a flood of short lines, and of one
    endless line, and the latest output is there; the lines it returns are bounded, not the flood's."""
    path = tmp_path / "console.log"
    with path.open("wb") as stream:
        stream.write(b"browservm-net: status=ok address=192.168.100.3/24\n")
        stream.write(b"\n" * (3 * MiB))
        stream.write(b"z" * (2 * MiB) + b"\n")
        stream.write(b"browservm-ready: service=desktop state=exited code=1\n")
    lines = ConsoleLog(path).ends()
    assert lines[0] == "browservm-net: status=ok address=192.168.100.3/24"
    assert lines[-1] == "browservm-ready: service=desktop state=exited code=1"
    assert len(lines) <= 2 * MAX_LINES
    assert max(len(line) for line in lines) == MAX_LINE
    short = tmp_path / "short.log"
    short.write_bytes(b"boot\r\nlast line without its newline")
    assert ConsoleLog(short).ends() == ["boot", "last line without its newline"]
    assert ConsoleLog(tmp_path / "absent.log").ends() == []
