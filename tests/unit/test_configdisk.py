"""The per-VM config disk: what the host writes is what the guest reads, and nothing else passes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from browservm.guest import configdisk
from browservm.vm.config_disks import new_secrets


def test_what_the_host_writes_the_guest_reads_and_only_its_owner_can(tmp_path: Path) -> None:
    document = {"vm_id": "vm-abc", "secrets": new_secrets()}
    configdisk.write(tmp_path / "config.img", document)
    assert (tmp_path / "config.img").stat().st_size == configdisk.SIZE  # whole sectors for virtio-blk
    assert stat.S_IMODE((tmp_path / "config.img").stat().st_mode) == 0o600
    assert configdisk.read(tmp_path / "config.img") == document
    with pytest.raises(FileExistsError):  # never replaced under a running VM
        configdisk.write(tmp_path / "config.img", document)


def test_every_vm_gets_its_own_secrets() -> None:
    first, second = new_secrets(), new_secrets()
    assert first["agent"] != second["agent"] and first["vnc"] != second["vnc"]
    assert len(first["agent"]) == 64 and len(first["vnc"]) == 8  # VNC passwords are cut at 8 characters


@pytest.mark.parametrize(("block", "reason"), [
    (b"\0" * 4096, "no magic line"),
    (configdisk.MAGIC + b"{not json", "unreadable"),
    (configdisk.MAGIC + b"[1, 2]", "not a JSON object"),
])
def test_anything_else_is_refused(block: bytes, reason: str) -> None:
    with pytest.raises(configdisk.ConfigDiskError, match=reason):
        configdisk.decode(block)


def test_a_document_too_large_for_the_disk_is_refused() -> None:
    with pytest.raises(configdisk.ConfigDiskError, match="more than the disk"):
        configdisk.encode({"x": "y" * configdisk.SIZE})
