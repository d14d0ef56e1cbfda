"""Only the controller opens a desktop: the real VNC server asks for the VM's own password, which the
proxy presents for the viewer, and the viewer never sees it.

The guest's desktop supervisor runs the real Xvnc (the full image's) or Xvfb and x11vnc (the minimal
image's), and websockify, in a namespace, with the password installed the way the image's unit
installs it (from a config disk the host wrote). Then: a client without the password gets nowhere;
the proxy with it relays a working RFB session (ServerInit and a framebuffer update come back to the
viewer); the proxy with a wrong one is a clear rfb.auth failure; a new password file (a restored VM's)
is taken by the next client. Each on both desktop paths: RFB straight to the VNC server, and through
websockify.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from browservm import rfb
from browservm.api.proxy import Upstream, ViewerProxy
from browservm.guest import configdisk
from browservm.guest.desktop import install_vnc_password, password_file_bytes
from browservm.hostnet.netns import NetworkNamespace
from tests.unit.test_proxy import close_of, controller, to, within

from .conftest import Namespaces, run
from .test_desktop_real import markers_until

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not all(shutil.which(p) for p in ("Xvnc", "Xvfb", "x11vnc", "websockify")),
                       reason="needs tigervnc-standalone-server, xvfb, x11vnc and websockify (scripts/install.sh "
                              "installs them)"),
]

PASSWORD = "Kq3x9Zt1"
LOCALHOST = IPv4Address("127.0.0.1")
VNC_PORT = 5988
WIDTH, HEIGHT = 1024, 768


# The VNC server's parts of each image's desktop (rootfs.SERVICES), websockify for the seed's path.
SERVICES = {"xvnc": ["xvnc", "websockify"], "x11vnc": ["xvfb", "x11vnc", "websockify"]}


def secrets_for(password: str) -> dict[str, str]:
    """The VNC secrets as the host writes them on a config disk (vm/config_disks.py)."""
    return {"vnc": password, "vnc_file": rfb.vnc_password_file(password).hex()}


@dataclass
class Desktop:
    netns: NetworkNamespace
    password_file: Path
    services: list[str]

    path: str = "rfb"

    def upstream(self, password: str | None) -> Upstream:
        if self.path == "rfb":
            return Upstream(self.netns, LOCALHOST, VNC_PORT, websocket=False, vnc_password=password)
        return Upstream(self.netns, LOCALHOST, 6080, websocket=True, vnc_password=password)

    async def websocket(self) -> ClientConnection:
        """A connection to websockify as any local process could make one: no proxy in between."""
        with self.netns.entered():
            sock = socket.socket()
        sock.connect(("127.0.0.1", 6080))
        return await connect("ws://127.0.0.1:6080/websockify", sock=sock, subprotocols=[Subprotocol("binary")],
                             compression=None, proxy=None, open_timeout=30)


@contextlib.contextmanager
def desktop_with_password(tmp: Path, name: str, services: list[str], last: str,
                          **config: object) -> Iterator[tuple[str, Path, dict[str, dict[str, str]]]]:
    """The guest's desktop supervisor in a namespace of its own (deleted after), with the VM's password put
    where the guest puts it: (namespace, password file, the markers up to `last`'s)."""
    spaces = Namespaces()
    proc: subprocess.Popen[str] | None = None
    try:
        ns = spaces.create(name)
        run("ip", "link", "set", "lo", "up", netns=ns)
        disk = tmp / "config.img"
        configdisk.write(disk, {"secrets": secrets_for(PASSWORD)})
        password_file = tmp / "vnc.pass"
        install_vnc_password(password_file, "root", services, disk)
        desktop_json = tmp / "desktop.json"
        desktop_json.write_text(json.dumps({"services": services, "vnc_password_file": str(password_file),
                                            **config}))
        proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "browservm.guest.desktop",
                                 "--config", str(desktop_json)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, start_new_session=True)
        yield ns, password_file, markers_until(proc, last)
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        spaces.cleanup()


@pytest.fixture(scope="module", params=list(SERVICES))
def running(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Desktop]:
    services = SERVICES[request.param]
    with desktop_with_password(tmp_path_factory.mktemp("vncpw"), "vncpw", services, "websockify", display=":88",
                               geometry=f"{WIDTH}x{HEIGHT}x24", vnc_port=VNC_PORT) as (ns, password_file, seen):
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert seen.get("websockify", {}).get("state") == "ready", seen
        yield Desktop(NetworkNamespace(ns), password_file, services)


@pytest.fixture(params=["rfb", "websockify"])
def desktop(running: Desktop, request: pytest.FixtureRequest) -> Desktop:
    """The one running desktop, reached by the proxy on each desktop path."""
    return dataclasses.replace(running, path=request.param)


def test_only_the_password_files_owner_reads_it(running: Desktop) -> None:
    assert running.password_file.stat().st_mode & 0o777 == 0o600


def test_a_client_without_the_password_is_refused(running: Desktop) -> None:
    async def scenario() -> tuple[bytes, int]:
        websocket = await running.websocket()
        try:
            reader = rfb.MessageReader(lambda: websocket.recv(decode=False))
            assert await within(reader.read(12)) == rfb.VERSION
            await websocket.send(rfb.VERSION)
            (count,) = await within(reader.read(1))
            offered = await within(reader.read(count))
            await websocket.send(bytes([rfb.VNC_AUTH]))
            challenge = await within(reader.read(16))
            await websocket.send(rfb.vnc_response("guessed1", challenge))
            (result,) = struct.unpack(">I", await within(reader.read(4)))
            return offered, result
        finally:
            await websocket.close()

    offered, result = asyncio.run(scenario())
    assert offered == bytes([rfb.VNC_AUTH])  # no "none": the password is the only way in
    assert result != 0


async def rfb_session(viewer: ClientConnection) -> tuple[bytes, int, int, int]:
    """A viewer's RFB 3.8 session: what it received, the desktop's size, and the first update's type."""
    received = bytearray()

    async def receive() -> bytes:
        data = await viewer.recv(decode=False)
        received.extend(data)
        return data

    reader = rfb.MessageReader(receive)
    assert await within(reader.read(12)) == rfb.VERSION
    await viewer.send(rfb.VERSION)
    assert await within(reader.read(2)) == bytes([1, rfb.NO_AUTH])
    await viewer.send(bytes([rfb.NO_AUTH]))
    assert await within(reader.read(4)) == struct.pack(">I", 0)
    await viewer.send(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await within(reader.read(4)))
    await within(reader.read(16))  # pixel format
    (name_length,) = struct.unpack(">I", await within(reader.read(4)))
    await within(reader.read(name_length))
    await viewer.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))  # FramebufferUpdateRequest, full
    (message_type,) = await within(reader.read(1))
    return bytes(received), width, height, message_type


def test_the_proxy_authenticates_for_the_viewer_and_keeps_the_password(desktop: Desktop) -> None:
    async def scenario() -> tuple[bytes, int, int, int]:
        async with controller(ViewerProxy(), to(desktop.upstream(PASSWORD))) as ctl, ctl.viewer() as viewer:
            return await rfb_session(viewer)

    received, width, height, message_type = asyncio.run(scenario())
    assert (width, height, message_type) == (WIDTH, HEIGHT, 0)  # ServerInit, then a FramebufferUpdate
    assert PASSWORD.encode() not in received


def test_a_wrong_password_is_an_rfb_auth_failure(desktop: Desktop) -> None:
    async def scenario() -> tuple[int | None, str | None]:
        async with controller(ViewerProxy(), to(desktop.upstream("wrong123"))) as ctl, ctl.viewer() as viewer:
            return await close_of(viewer)

    code, reason = asyncio.run(scenario())
    assert code == 4502 and reason is not None
    assert reason.startswith("rfb.auth: the VNC server refused the VM's password"), reason


def test_a_new_password_in_the_file_takes_over_at_the_next_client(desktop: Desktop) -> None:
    # What a VM restored from a snapshot does (guest/identity.py): its own password, no restart.
    async def close_with(password: str) -> tuple[int | None, str | None]:
        async with controller(ViewerProxy(), to(desktop.upstream(password))) as ctl, ctl.viewer() as viewer:
            return await close_of(viewer)

    async def session_with(password: str) -> int:
        async with controller(ViewerProxy(), to(desktop.upstream(password))) as ctl, ctl.viewer() as viewer:
            return (await rfb_session(viewer))[3]

    desktop.password_file.write_bytes(password_file_bytes(secrets_for("Rotated9"), desktop.services))
    try:
        assert asyncio.run(session_with("Rotated9")) == 0
        code, reason = asyncio.run(close_with(PASSWORD))
        assert code == 4502 and reason is not None and reason.startswith("rfb.auth:")
    finally:
        desktop.password_file.write_bytes(password_file_bytes(secrets_for(PASSWORD), desktop.services))
