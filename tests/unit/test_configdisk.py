"""The per-VM config disk: what the host writes is what the guest reads, and nothing else passes."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from browservm import rfb
from browservm.guest import configdisk, desktop
from browservm.guest.desktop import password_file_bytes
from browservm.rfb import vnc_password_file
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


def test_the_vnc_password_file_is_what_tigervncs_vncpasswd_writes() -> None:
    # `echo Kq3x9Zt1 | vncpasswd -f | xxd -p` (TigerVNC 1.12) printed these bytes.
    assert vnc_password_file("Kq3x9Zt1") == bytes.fromhex("6d3e5c5cf9623455")


@pytest.mark.parametrize(("services", "server"), [(("xvnc", "openbox"), "xvnc"), (("xvfb", "x11vnc"), "x11vnc")])
def test_the_guest_writes_the_password_file_its_vnc_server_reads(services: tuple[str, ...], server: str) -> None:
    made = new_secrets()
    content = password_file_bytes(dict(made), services)
    if server == "xvnc":
        assert content == vnc_password_file(made["vnc"])  # vncpasswd's format, made on the host
    else:
        assert content == made["vnc"].encode() + b"\n"  # x11vnc reads the password itself


def test_an_xvnc_guest_without_the_password_file_bytes_refuses_to_start() -> None:
    made = new_secrets()
    with pytest.raises(configdisk.ConfigDiskError, match=r"secrets\.vnc_file"):
        password_file_bytes({"vnc": made["vnc"]}, ("xvnc",))
    with pytest.raises(configdisk.ConfigDiskError, match=r"secrets\.vnc_file"):
        password_file_bytes({**made, "vnc_file": "zz"}, ("xvnc",))


def test_xvnc_takes_as_much_clipboard_as_the_proxy_lets_through() -> None:
    assert desktop.MAX_CUT_TEXT == rfb.MAX_CUT_TEXT
