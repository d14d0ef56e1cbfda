"""Settings refuse what an API or a command line could pass on to QEMU or the kernel, naming the field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browservm.config import load_settings
from browservm.errors import InvalidInput


def test_kernel_and_rootfs_become_absolute_paths_of_regular_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "vmlinux").write_bytes(b"x")
    os.symlink(tmp_path / "vmlinux", tmp_path / "nbd:link")
    monkeypatch.chdir(tmp_path)
    settings = load_settings(kernel=Path("nbd:link"))  # a relative name QEMU would read as a protocol
    assert settings.kernel == tmp_path / "vmlinux"


@pytest.mark.parametrize(("name", "reason"), [("missing", "does not exist"), (".", "not a regular file"),
                                              ("/dev/null", "not a regular file")])
def test_anything_else_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, reason: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput) as excinfo:
        load_settings(rootfs=Path(name))
    assert excinfo.value.field == "rootfs" and reason in excinfo.value.reason
