"""vm/screen.py: a viewer that reads raw frames and says when the browser is on screen, against a
small RFB server on loopback that draws what each test wants; bounds on what the server may send.
And the other condition a snapshot waits for: the VM idle (vm/readiness.py wait_settled).
(The real desktop: the snapshot a pooled login uses, tests/integration/test_login_e2e.py.)"""

from __future__ import annotations

import asyncio
import random
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest

from browservm import rfb
from browservm.errors import ProbeFailed
from browservm.vm.readiness import wait_settled
from browservm.vm.screen import (
    MAX_PIXELS,
    PIXEL_FORMAT,
    ScreenError,
    browser_shown,
    hang_up,
    wait_browser_on_screen,
)
from browservm.vmm import process
from browservm.vmm.process import VmmProcess

WIDTH, HEIGHT = 64, 40
PASSWORD = "pw123456"


def bare() -> bytes:
    return bytes(WIDTH * HEIGHT * 4)


def browser() -> bytes:
    """A page under a toolbar: mostly white, with many colours (as antialiased text makes)."""
    rng = random.Random(1)
    pixels = [0xFFFFFF] * (WIDTH * HEIGHT)
    for i in range(WIDTH * 6):  # the toolbar
        pixels[i] = rng.randrange(1 << 24)
    return struct.pack(f"<{len(pixels)}I", *pixels)


def test_the_bare_desktop_is_not_the_browser_and_a_painted_page_is() -> None:
    assert browser_shown(bare()) == (False, 0.0, 1)
    shown, covered, colours = browser_shown(browser())
    assert shown and covered == 1.0 and colours >= 16
    white = struct.pack("<I", 0xFFFFFF) * (WIDTH * HEIGHT)
    assert not browser_shown(white)[0]  # a window mapped, not yet painted with its toolbar


Frames = list[list[tuple[int, int, int, int, bytes]]]  # per update: rectangles (x, y, w, h, pixels)


def server(frames: Frames, width: int = WIDTH, height: int = HEIGHT) -> Callable[
        [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """An RFB 3.8 server asking for PASSWORD, answering each FramebufferUpdateRequest with the next update."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(rfb.VERSION)
        await reader.readexactly(12)
        challenge = bytes(range(16))
        writer.write(bytes([1, rfb.VNC_AUTH]) + challenge)
        await reader.readexactly(1)
        ok = await reader.readexactly(16) == rfb.vnc_response(PASSWORD, challenge)
        writer.write(struct.pack(">I", 0 if ok else 1) + (b"" if ok else struct.pack(">I", 3) + b"bad"))
        if not ok:
            writer.close()
            return
        assert await reader.readexactly(1) == b"\x01"  # shared
        writer.write(struct.pack(">HH", width, height) + bytes(16) + struct.pack(">I", 4) + b"test")
        assert await reader.readexactly(20) == b"\0\0\0\0" + PIXEL_FORMAT
        assert await reader.readexactly(8) == struct.pack(">BxHi", 2, 1, 0)
        for update in frames:
            await reader.readexactly(10)  # FramebufferUpdateRequest
            writer.write(b"\x02")  # a Bell first: skipped
            writer.write(struct.pack(">BxH", 0, len(update)))
            for x, y, w, h, pixels in update:
                writer.write(struct.pack(">HHHHi", x, y, w, h, 0) + pixels)
            await writer.drain()
        await reader.read()

    return serve


async def watch_server(frames: Frames, password: str = PASSWORD, timeout: float = 5.0,
                       size: tuple[int, int] = (WIDTH, HEIGHT)) -> float:
    listener = await asyncio.start_server(server(frames, *size), "127.0.0.1", 0)
    async with listener:
        reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
        try:
            return (await wait_browser_on_screen(reader, writer, password, timeout)).covered
        finally:
            writer.close()


def test_frames_are_read_until_the_browser_shows_updates_drawn_into_one_framebuffer() -> None:
    page = browser()
    top, bottom = page[:WIDTH * 12 * 4], page[WIDTH * 12 * 4:]
    frames: Frames = [[(0, 0, WIDTH, HEIGHT, bare())],
                      [(0, 0, WIDTH, 12, top)],  # the toolbar and a little of the page: not yet
                      [(0, 12, WIDTH, 28, bottom)]]
    assert asyncio.run(watch_server(frames)) == 1.0


def test_a_browser_that_never_shows_times_out_saying_what_the_frames_showed() -> None:
    with pytest.raises(TimeoutError) as excinfo:
        asyncio.run(watch_server([[(0, 0, WIDTH, HEIGHT, bare())]], timeout=0.5))
    assert "1 frames, the last 0% covered with 1 colours" in str(excinfo.value)


def test_a_wrong_password_is_a_handshake_failure() -> None:
    with pytest.raises(rfb.HandshakeFailed, match="refused the VM's password"):
        asyncio.run(watch_server([], password="wrong999"))


@pytest.mark.parametrize(("size", "frames", "said"), [
    ((4096, 4096), [], "a 4096x4096 screen"),
    ((WIDTH, HEIGHT), [[(WIDTH - 4, 0, 8, 1, bytes(32))]], "outside its 64x40 screen"),
])
def test_what_the_server_may_send_is_bounded(size: tuple[int, int], frames: Frames, said: str) -> None:
    assert MAX_PIXELS < 4096 * 4096
    with pytest.raises(ScreenError, match=said):
        asyncio.run(watch_server(frames, size=size))


def test_hang_up_waits_until_the_server_let_the_viewer_go() -> None:
    """Until x11vnc closed its side it still counts the viewer: a snapshot must not be taken before."""
    async def scenario(server_closes: bool) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(bytes(1 << 20))  # a frame still on its way
            await reader.read()  # the viewer's end
            if server_closes:
                writer.close()
            else:
                await asyncio.Event().wait()  # keeps the viewer until cancelled: the hang-up's deadline ends it

        listener = await asyncio.start_server(serve, "127.0.0.1", 0)
        async with listener:
            reader, writer = await asyncio.open_connection(*listener.sockets[0].getsockname()[:2])
            try:
                await hang_up(reader, writer, 0.5)
                assert reader.at_eof()
            finally:
                writer.close()

    asyncio.run(scenario(server_closes=True))
    with pytest.raises(ScreenError, match=r"did not close the connection within 0\.5 s"):
        asyncio.run(scenario(server_closes=False))


def test_a_vm_is_settled_once_its_vmm_idles_and_not_while_it_is_busy() -> None:
    """wait_settled against real processes: one asleep (idle), one spinning (a busy guest)."""
    idle = subprocess.Popen(["sleep", "60"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        def of(child: subprocess.Popen[bytes]) -> VmmProcess:
            start = process.start_time(child.pid)
            assert start is not None
            return VmmProcess(child.pid, start)

        assert asyncio.run(wait_settled(of(idle), 10)) < 0.25
        with pytest.raises(TimeoutError, match="still used"):
            asyncio.run(wait_settled(of(busy), 1))
        gone = of(idle)
        idle.kill()
        idle.wait()
        with pytest.raises(ProbeFailed) as excinfo:
            asyncio.run(wait_settled(gone, 10))
        assert excinfo.value.hop == "vmm.exited"
    finally:
        for child in (idle, busy):
            child.kill()
            child.wait()
