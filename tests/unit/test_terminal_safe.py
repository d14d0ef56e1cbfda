"""Console text a guest wrote is shown to an operator's terminal, never obeyed by it."""

from __future__ import annotations

from browservm.vm.console import terminal_safe


def test_escape_sequences_are_shown_not_obeyed() -> None:
    hostile = "ok\x1b]0;pwned\x07 \x1b[2J\x1b[31mred\x00\r"
    shown = terminal_safe(hostile)
    assert "\x1b" not in shown and "\x07" not in shown and "\x00" not in shown and "\r" not in shown
    assert shown == "ok\\x1b]0;pwned\\x07 \\x1b[2J\\x1b[31mred\\x00\\x0d"


def test_ordinary_lines_are_unchanged() -> None:
    line = "[    0.734] IP-Config: Complete:\tdevice=eth0, addr=192.168.100.2 (é, 中)"
    assert terminal_safe(line) == line
