"""What the built guest image carries, and what it must not: read from the image file (debugfs), no boot."""

from __future__ import annotations

import json
import subprocess

import pytest

from browservm.guest.desktop import CONTROL_SOCKET
from browservm.images.rootfs import VNC_PASSWORD_FILE, RootfsImage
from tests.support.derived_image import DerivedImageError, read_guest_file

pytestmark = pytest.mark.host


def test_the_build_machines_package_proxy_is_not_in_the_image(minimal_image: RootfsImage) -> None:
    # mmdebstrap keeps its --aptopt options (the build machine's Acquire::http::Proxy among them) in
    # 99mmdebstrap; a guest must not learn of, or reach through, the build machine's proxy.
    listing = read_guest_file(minimal_image.path, "/etc/apt/apt.conf.d/01autoremove")  # the directory is there
    assert listing
    with pytest.raises(DerivedImageError, match="not found"):
        read_guest_file(minimal_image.path, "/etc/apt/apt.conf.d/99mmdebstrap")


def test_the_desktop_asks_for_the_vms_own_vnc_password(minimal_image: RootfsImage) -> None:
    config = json.loads(read_guest_file(minimal_image.path, "/etc/browservm/desktop.json"))
    assert config["vnc_password_file"] == VNC_PASSWORD_FILE
    unit = read_guest_file(minimal_image.path, "/etc/systemd/system/browservm-desktop.service").decode()
    assert f"--install-vnc-password {VNC_PASSWORD_FILE}" in unit


def test_the_full_image_runs_xvnc_with_the_vms_own_password(full_image: RootfsImage) -> None:
    config = json.loads(read_guest_file(full_image.path, "/etc/browservm/desktop.json"))
    assert config["services"][0] == "xvnc" and "x11vnc" not in config["services"]
    assert config["vnc_password_file"] == VNC_PASSWORD_FILE


def test_the_full_image_keeps_profiles_and_draws_cjk_text(full_image: RootfsImage) -> None:
    """The profile keeper is enabled and can seal (Debian's cryptography), the desktop offers it Chromium's
    control socket, and a CJK font is there (a pasted 日本語 was drawn as boxes without one)."""
    config = json.loads(read_guest_file(full_image.path, "/etc/browservm/desktop.json"))
    assert config["control_socket"] == str(CONTROL_SOCKET)
    unit = read_guest_file(full_image.path, "/etc/systemd/system/browservm-profile-keeper.service").decode()
    assert "ExecStart=/usr/lib/browservm/bin/browservm-profile-keeper" in unit
    enabled = subprocess.run(["debugfs", "-R", "ls -l /etc/systemd/system/multi-user.target.wants",
                              str(full_image.path)], capture_output=True, text=True, check=True).stdout
    assert "browservm-profile-keeper.service" in enabled
    assert read_guest_file(full_image.path, "/usr/lib/python3/dist-packages/cryptography/__init__.py")
    assert read_guest_file(full_image.path, "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc")[:4] == b"ttcf"
