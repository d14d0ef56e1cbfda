"""Whether a VM's desktop shows the browser, judged by the pixels a viewer gets.

The guest says Chromium runs (`DevTools listening`) some 13 s under emulation before its window is
painted; a snapshot made in between would restore to a black screen and make every clone paint
it again. So the snapshot maker (and bench/session_bench.py) read real frames over RFB and wait
for the browser.

"Browser on screen": the bare desktop is one flat colour (Openbox draws no wallpaper; Xvfb,
Openbox and x11vnc from the image grabbed this way give 1280x800 pixels of 0x000000). Chromium,
maximised, covers it with a page under a toolbar of antialiased text and icons. A frame shows the
browser when at least MIN_COVERED of its sampled pixels are not the bare desktop's colour AND it
has at least MIN_COLOURS distinct colours: the bare desktop measures 0 % and 1 colour, a maximised
Chromium nearly 100 % and far more than 16, so each threshold sits far from both sides; together
they also refuse a window mapped but not yet painted (black), a white rectangle without its
toolbar (few colours), and a desktop with only a stray tooltip (little covered).

The guest is not trusted for sizes: the screen is at most MAX_PIXELS, every rectangle must lie
inside it, and a name or cut text longer than MAX_TEXT ends the watch.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from browservm import rfb

BARE_DESKTOP = 0x000000
MIN_COVERED = 0.5
MIN_COLOURS = 16
SAMPLE_STEP = 17  # every 17th pixel: prime to the width, so the samples run diagonally over the screen
MAX_PIXELS = 2560 * 1600  # the desktop's is 1280x800; the judging runs on the controller's event loop
MAX_TEXT = 1 << 20
# SetPixelFormat: 32 bits per pixel, depth 24, little-endian, true colour, 8 bits each, red at bit 16:
# each pixel reads as one native uint32 0x00RRGGBB.
PIXEL_FORMAT = struct.pack(">BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)


class ScreenError(Exception):
    """The VNC server broke the protocol or sent more than it may; the message says how."""


@dataclass(frozen=True)
class Screen:
    viewer_at: float  # perf_counter: the first FramebufferUpdate's header arrived
    first_frame_at: float  # the first update complete
    screen_at: float  # the first complete frame that shows the browser
    covered: float  # its share of sampled pixels not the bare desktop's colour
    colours: int  # its distinct colours (sampled)


@dataclass
class Seen:
    """The last frame judged, for a message when the browser never shows."""

    frames: int = 0
    covered: float = 0.0
    colours: int = 0

    def __str__(self) -> str:
        if not self.frames:
            return "no frame came"
        return f"{self.frames} frames, the last {self.covered:.0%} covered with {self.colours} colours"


def browser_shown(frame: bytes | bytearray) -> tuple[bool, float, int]:
    """(browser on screen?, share not the bare desktop's colour, distinct colours) of one 0x00RRGGBB frame.
    Sampled: some 60,000 pixels of 1,024,000, a few ms of Python per frame."""
    pixels = memoryview(frame).cast("I")[::SAMPLE_STEP]
    counts = Counter(p & 0xFFFFFF for p in pixels)
    covered = 1.0 - counts.get(BARE_DESKTOP, 0) / len(pixels)
    return covered >= MIN_COVERED and len(counts) >= MIN_COLOURS, covered, len(counts)


async def _skip(reader: rfb.MessageReader, length: int, what: str) -> None:
    if length > MAX_TEXT:
        raise ScreenError(f"the VNC server announced {what} of {length} bytes (at most {MAX_TEXT})")
    await reader.read(length)


async def watch(reader: rfb.MessageReader, send: Callable[[bytes], Awaitable[None]],
                seen: Seen | None = None) -> Screen:
    """After the security handshake: ClientInit, then full-screen raw frames until one shows the
    browser. `seen` is kept up to date with the last frame judged."""
    seen = seen if seen is not None else Seen()
    await send(b"\x01")  # ClientInit: shared, so other viewers stay
    width, height = struct.unpack(">HH", await reader.read(4))
    if not 0 < width * height <= MAX_PIXELS:
        raise ScreenError(f"the VNC server announced a {width}x{height} screen")
    await reader.read(16)  # the server's pixel format: replaced by ours
    (name_length,) = struct.unpack(">I", await reader.read(4))
    await _skip(reader, name_length, "a desktop name")
    await send(b"\x00\x00\x00\x00" + PIXEL_FORMAT)  # SetPixelFormat
    await send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
    frame = bytearray(width * height * 4)
    viewer_at = first_frame_at = 0.0
    incremental = 0  # the first request asks for the whole screen; later ones for what changed
    while True:
        await send(struct.pack(">BBHHHH", 3, incremental, 0, 0, width, height))
        incremental = 1
        while True:  # skip what is not a FramebufferUpdate
            (kind,) = await reader.read(1)
            if kind == 0:
                break
            if kind == 2:  # Bell
                continue
            if kind == 3:  # ServerCutText
                (length,) = struct.unpack(">3xI", await reader.read(7))
                await _skip(reader, length, "cut text")
                continue
            raise ScreenError(f"unexpected RFB server message type {kind}")
        viewer_at = viewer_at or time.perf_counter()
        (rects,) = struct.unpack(">xH", await reader.read(3))
        for _ in range(rects):
            x, y, w, h, encoding = struct.unpack(">HHHHi", await reader.read(12))
            if encoding != 0:
                raise ScreenError(f"the VNC server sent encoding {encoding}; raw (0) was asked for")
            if x + w > width or y + h > height:
                raise ScreenError(f"the VNC server sent a {w}x{h} rectangle at {x},{y}, outside its "
                                  f"{width}x{height} screen")
            data = await reader.read(w * h * 4)
            for row in range(h):  # into the framebuffer, row by row
                start = ((y + row) * width + x) * 4
                frame[start:start + w * 4] = data[row * w * 4:(row + 1) * w * 4]
        now = time.perf_counter()
        first_frame_at = first_frame_at or now
        shown, seen.covered, seen.colours = browser_shown(frame)
        seen.frames += 1
        if shown:
            return Screen(viewer_at, first_frame_at, now, seen.covered, seen.colours)


async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
    """Close our side, then read (and drop) what the server still sends until it closes its side too:
    only then has x11vnc let this viewer go. A snapshot taken while it still counted one would wake
    in every clone with a viewer at an address that is gone, whose frames x11vnc keeps trying to send.
    ScreenError if the server does not close within `timeout`."""
    writer.write_eof()
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(1 << 16):
                pass
    except TimeoutError:
        raise ScreenError(f"the VNC server did not close the connection within {timeout:g} s of the viewer "
                          "leaving") from None
    writer.close()


async def wait_browser_on_screen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, password: str,
                                 timeout: float) -> Screen:
    """Over a new connection to the VM's x11vnc: authenticate with its password and watch until
    the browser is on screen. TimeoutError (saying what the frames showed) after `timeout`;
    ScreenError or rfb.HandshakeFailed when the server misbehaves, or announces a version outside
    rfb.SERVER_VERSIONS (the readiness banner check's and the proxy's too)."""
    seen = Seen()

    async def receive() -> bytes:
        data = await reader.read(1 << 16)
        if not data:
            raise ScreenError("the VNC server closed the connection")
        return data

    async def send(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    try:
        async with asyncio.timeout(timeout):
            messages = rfb.MessageReader(receive)
            await rfb.authenticate(messages, send, await messages.read(len(rfb.VERSION)), password)
            return await watch(messages, send, seen)
    except TimeoutError:
        raise TimeoutError(f"the browser was not on screen within {timeout:g} s ({seen})") from None
