"""Which files the image build accepts as a tool's executable: one the kernel can exec, never a
placeholder an install script would have replaced (Claude Code's bin/claude.exe, a shebang-less
shell snippet that fails with "Exec format error")."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from browservm.images.rootfs import TOOL_EXECUTABLES, _runnable

PLACEHOLDER = b'echo "Error: claude native binary not installed." >&2\nexit 1\n'


def test_an_elf_binary_and_a_script_are_runnable_a_placeholder_is_not(tmp_path: Path) -> None:
    elf = tmp_path / "python"
    shutil.copy(sys.executable, elf)
    script = tmp_path / "tool"
    script.write_bytes(b"#!/usr/bin/env node\nconsole.log(1)\n")
    placeholder = tmp_path / "claude.exe"
    placeholder.write_bytes(PLACEHOLDER)
    for path in (script, placeholder):
        path.chmod(0o755)
    assert _runnable(elf) and _runnable(script)
    assert not _runnable(placeholder)
    script.chmod(0o644)
    assert not _runnable(script)  # not executable


def test_claude_comes_from_its_platform_package() -> None:
    assert TOOL_EXECUTABLES["claude"] == "@anthropic-ai/claude-code-linux-x64/claude"
