"""What Xvnc gives a viewer that x11vnc could not (issue 22): the desktop follows the viewer's size, and
the clipboard carries UTF-8 both ways. The real Xvnc under the guest's desktop supervisor, in a
namespace, with the VM's password; a real RFB client through the controller's proxy, which bounds the
size a viewer may ask for (rfb.bound_desktop_size: Xvnc takes up to 32768x32768 itself); the X side
read and written with xdpyinfo and xclip, as any X program in the guest sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import subprocess
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

import pytest
from websockets.asyncio.client import ClientConnection

from browservm import rfb
from browservm.api.proxy import Upstream, ViewerProxy
from browservm.hostnet.netns import NetworkNamespace
from tests.unit.test_proxy import controller, to, within

from .test_vnc_password import PASSWORD, desktop_with_password

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not all(shutil.which(p) for p in ("Xvnc", "xclip", "xdpyinfo")),
                       reason="needs tigervnc-standalone-server, xclip and x11-utils (scripts/install.sh installs "
                              "them)"),
]

DISPLAY, VNC_PORT = ":89", 5989
TEXT = "héllo 日本 ✓"

RAW, EXTENDED_DESKTOP_SIZE, EXTENDED_CLIPBOARD = 0, -308, -1063131698  # 0xC0A1E5CE, as a signed 32-bit
# The Extended Clipboard's flags: the text format, and the actions.
CLIP_TEXT, CLIP_CAPS, CLIP_REQUEST, CLIP_NOTIFY, CLIP_PROVIDE = 1, 1 << 24, 1 << 25, 1 << 27, 1 << 28
FROM_CLIENT = 1  # ExtendedDesktopSize's reason: this client's SetDesktopSize


@dataclass
class Xvnc:
    netns: NetworkNamespace
    ns: str

    def x(self, *argv: str, stdin: str | None = None) -> str:
        """An X program's output, run in the desktop's namespace on its display."""
        done = subprocess.run(["ip", "netns", "exec", self.ns, "env", f"DISPLAY={DISPLAY}", *argv], input=stdin,
                              capture_output=True, text=True, timeout=30, check=True)
        return done.stdout

    def screen_size(self) -> tuple[int, int]:
        line = next(line for line in self.x("xdpyinfo").splitlines() if "dimensions:" in line)
        width, height = line.split()[1].split("x")
        return int(width), int(height)


@pytest.fixture(scope="module")
def xvnc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Xvnc]:
    with desktop_with_password(tmp_path_factory.mktemp("xvnc"), "xvnc", ["xvnc"], "xvnc", display=DISPLAY,
                               geometry="1280x800x24", vnc_port=VNC_PORT) as (ns, _, seen):
        assert seen["xvnc"]["state"] == "ready" and seen["xvnc"]["display"] == DISPLAY, seen
        yield Xvnc(NetworkNamespace(ns), ns)


class Viewer:
    """An RFB 3.8 viewer through the proxy (which authenticated for it): raw 8-bit pixels, the
    ExtendedDesktopSize and Extended Clipboard pseudo-encodings."""

    def __init__(self, websocket: ClientConnection) -> None:
        self.websocket = websocket
        self.reader = rfb.MessageReader(lambda: websocket.recv(decode=False))
        self.screen_id = 0

    async def start(self) -> tuple[int, int]:
        read, send = self.reader.read, self.websocket.send
        assert await within(read(12)) == rfb.VERSION
        await send(rfb.VERSION)
        assert await within(read(2)) == bytes([1, rfb.NO_AUTH])
        await send(bytes([rfb.NO_AUTH]))
        assert await within(read(4)) == struct.pack(">I", 0)
        await send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await within(read(4)))
        await within(read(16))
        (name_length,) = struct.unpack(">I", await within(read(4)))
        await within(read(name_length))
        # 8 bits a pixel (BGR233): a 2560x1600 frame is 4 MiB, not 16.
        await send(struct.pack(">BxxxBBBBHHHBBBxxx", 0, 8, 8, 0, 1, 7, 7, 3, 0, 3, 6))
        await send(struct.pack(">BxHiii", 2, 3, RAW, EXTENDED_DESKTOP_SIZE, EXTENDED_CLIPBOARD))
        return width, height

    async def request_update(self, width: int, height: int, incremental: bool = True) -> None:
        await self.websocket.send(struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height))

    async def messages(self) -> AsyncIterator[tuple[str, tuple[int, ...], bytes]]:
        """("size", (reason, status, width, height), b"") for each ExtendedDesktopSize, ("clipboard",
        (flags,), payload) for each extended clipboard message; the rest is read and passed over."""
        read = self.reader.read
        while True:
            (kind,) = await within(read(1))
            if kind == 0:  # FramebufferUpdate
                (count,) = struct.unpack(">xH", await within(read(3)))
                for _ in range(count):
                    x, y, w, h, encoding = struct.unpack(">HHHHi", await within(read(12)))
                    if encoding == RAW:
                        await within(read(w * h))
                    elif encoding == EXTENDED_DESKTOP_SIZE:
                        (screens,) = struct.unpack(">Bxxx", await within(read(4)))
                        layout = await within(read(16 * screens))
                        self.screen_id = struct.unpack_from(">I", layout)[0]
                        yield "size", (x, y, w, h), b""
                    else:
                        raise AssertionError(f"an encoding not asked for: {encoding}")
            elif kind == 2:  # Bell
                continue
            elif kind == 3:  # ServerCutText
                (length,) = struct.unpack(">xxxi", await within(read(7)))
                data = await within(read(abs(length)))
                if length < 0:
                    yield "clipboard", struct.unpack_from(">I", data), data[4:]
            else:
                raise AssertionError(f"a server message not expected: {kind}")

    async def set_desktop_size(self, width: int, height: int) -> None:
        await self.websocket.send(struct.pack(">BxHHBx", 251, width, height, 1)
                                  + struct.pack(">IHHHHI", self.screen_id, 0, 0, width, height, 0))

    async def clipboard(self, flags: int, payload: bytes = b"") -> None:
        body = struct.pack(">I", flags) + payload
        await self.websocket.send(struct.pack(">Bxxxi", 6, -len(body)) + body)


@contextlib.asynccontextmanager
async def viewer_of(xvnc: Xvnc) -> AsyncIterator[tuple[Viewer, tuple[int, int]]]:
    upstream = Upstream(xvnc.netns, IPv4Address("127.0.0.1"), VNC_PORT, websocket=False, vnc_password=PASSWORD)
    async with controller(ViewerProxy(), to(upstream)) as ctl, ctl.viewer() as websocket:
        viewer = Viewer(websocket)
        size = await viewer.start()
        yield viewer, size


async def size_after(viewer: Viewer, messages: AsyncIterator[tuple[str, tuple[int, ...], bytes]],
                     width: int, height: int) -> tuple[int, int]:
    """Ask for `width`x`height`; the size the server's answer to this client's request gives."""
    await viewer.set_desktop_size(width, height)
    await viewer.request_update(width, height)
    async for kind, fields, _ in messages:
        if kind == "size" and fields[0] == FROM_CLIENT:
            assert fields[1] == 0, f"Xvnc refused the layout: status {fields[1]}"
            return fields[2], fields[3]
    raise AssertionError("the connection ended")


def test_the_desktop_follows_the_size_a_viewer_asks_for_within_the_bounds(xvnc: Xvnc) -> None:
    async def scenario() -> list[tuple[int, int]]:
        async with viewer_of(xvnc) as (viewer, size):
            assert size == (1280, 800)
            await viewer.request_update(*size, incremental=False)
            messages = viewer.messages()
            async for kind, _, _ in messages:
                if kind == "size":  # the layout (and so the screen's id) comes with the first update
                    break
            fitted = await size_after(viewer, messages, 1600, 900)
            seen_by_x = xvnc.screen_size()
            bounded = await size_after(viewer, messages, 4000, 4000)
            return [fitted, seen_by_x, bounded, xvnc.screen_size()]

    fitted, seen_by_x, bounded, bounded_by_x = asyncio.run(scenario())
    assert fitted == seen_by_x == (1600, 900)  # the X screen itself, as Chromium's window sees it
    assert bounded == bounded_by_x == rfb.MAX_DESKTOP


# The second: 510 KB, more than Xvnc's own bound (256 KiB), within the proxy's (1 MiB).
@pytest.mark.parametrize("pasted_text", [TEXT, TEXT * 30_000], ids=["short", "510KB"])
def test_text_pasted_in_the_viewer_reaches_the_x_clipboard_in_utf8(xvnc: Xvnc, pasted_text: str) -> None:
    async def scenario() -> str:
        async with viewer_of(xvnc) as (viewer, _):
            messages = viewer.messages()
            async for kind, (flags,), _ in messages:
                if kind == "clipboard" and flags & CLIP_CAPS:  # Xvnc says it speaks the Extended Clipboard
                    break
            await viewer.clipboard(CLIP_CAPS | CLIP_REQUEST | CLIP_NOTIFY | CLIP_PROVIDE | CLIP_TEXT,
                                   struct.pack(">I", 1 << 20))
            await viewer.clipboard(CLIP_NOTIFY | CLIP_TEXT)  # the viewer has text: Xvnc now owns CLIPBOARD
            # An X program pastes: Xvnc asks the viewer for the text, which it provides.
            pasted = asyncio.ensure_future(asyncio.to_thread(xvnc.x, "xclip", "-o", "-selection", "clipboard"))
            async for kind, (flags,), _ in messages:
                if kind == "clipboard" and flags & CLIP_REQUEST and flags & CLIP_TEXT:
                    text = pasted_text.encode() + b"\0"
                    await viewer.clipboard(CLIP_PROVIDE | CLIP_TEXT, zlib.compress(struct.pack(">I", len(text)) + text))
                    break
            return str(await within(pasted))

    assert asyncio.run(scenario()) == pasted_text


def test_text_copied_in_the_guest_reaches_the_viewer_in_utf8(xvnc: Xvnc) -> None:
    async def scenario() -> bytes:
        async with viewer_of(xvnc) as (viewer, _):
            messages = viewer.messages()
            async for kind, (flags,), _ in messages:
                if kind == "clipboard" and flags & CLIP_CAPS:
                    break
            await viewer.clipboard(CLIP_CAPS | CLIP_REQUEST | CLIP_NOTIFY | CLIP_PROVIDE | CLIP_TEXT,
                                   struct.pack(">I", 1 << 20))
            # An X program copies (xclip keeps the selection until it is ended).
            owner = subprocess.Popen(["ip", "netns", "exec", xvnc.ns, "env", f"DISPLAY={DISPLAY}", "xclip", "-quiet",
                                      "-i", "-selection", "clipboard"], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
            try:
                assert owner.stdin is not None
                owner.stdin.write(TEXT)
                owner.stdin.close()
                async for kind, (flags,), payload in messages:
                    if kind == "clipboard" and flags & CLIP_NOTIFY and flags & CLIP_TEXT:
                        await viewer.clipboard(CLIP_REQUEST | CLIP_TEXT)
                    elif kind == "clipboard" and flags & CLIP_PROVIDE and flags & CLIP_TEXT:
                        data = zlib.decompressobj().decompress(payload)  # flushed, not finished
                        (length,) = struct.unpack_from(">I", data)
                        return data[4:4 + length]
                raise AssertionError("the connection ended")
            finally:
                owner.kill()
                owner.wait(timeout=30)

    assert asyncio.run(scenario()) == TEXT.encode() + b"\0"  # UTF-8, NUL-terminated as the extension says
