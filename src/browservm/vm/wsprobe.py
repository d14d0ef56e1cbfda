"""The last two hops to a VM's desktop: the WebSocket upgrade on :6080 and the RFB banner behind it
(or, on the rfb path, the banner straight from x11vnc on :5901).

A browser that gets WebSocket close code 1006 learns nothing; this probe
says which of the two failed and what came back instead. It speaks just
enough RFC 6455 for that: one upgrade request, one server frame read.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct

from browservm.errors import ProbeFailed
from browservm.vm.hops import RFB_BANNER, WS_UPGRADE

_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER = 16 * 1024
_MAX_FRAME = 64 * 1024  # an RFB banner is 12 bytes


def accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1((key + _GUID).encode(), usedforsecurity=False).digest()).decode()


async def websocket_upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                            path: str = "/websockify") -> dict[str, str]:
    """Send the upgrade request; return the response headers, or raise ProbeFailed(WS_UPGRADE)."""
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                  "Sec-WebSocket-Protocol: binary\r\n\r\n").encode())
    await writer.drain()
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        got = exc.partial[:80].decode(errors="replace") or "nothing"
        raise ProbeFailed(WS_UPGRADE, f"the server closed the connection after sending {got!r}") from None
    except asyncio.LimitOverrunError:
        raise ProbeFailed(WS_UPGRADE, "the response headers are too long") from None
    lines = head.decode(errors="replace").split("\r\n")
    status = lines[0]
    headers = {name.strip().lower(): value.strip() for name, _, value in
               (line.partition(":") for line in lines[1:] if line)}
    if not status.startswith("HTTP/1.1 101"):
        raise ProbeFailed(WS_UPGRADE, f"expected '101 Switching Protocols', got {status!r}")
    if headers.get("sec-websocket-accept") != accept_key(key):
        raise ProbeFailed(WS_UPGRADE, "the server's Sec-WebSocket-Accept does not match the request")
    return headers


async def read_frame(reader: asyncio.StreamReader, max_length: int = _MAX_FRAME) -> tuple[int, bytes]:
    """One unmasked server frame: (opcode, payload). The guest says how long it is: bounded first."""
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    if length > max_length:
        raise ProbeFailed(RFB_BANNER, f"the first WebSocket frame claims {length} bytes, more than {max_length}")
    if second & 0x80:
        await reader.readexactly(4)  # a server must not mask, but tolerate it
    return first & 0x0F, await reader.readexactly(length)


async def rfb_banner(reader: asyncio.StreamReader) -> str:
    """The VNC server's protocol banner ("RFB 003.008"), read through the WebSocket."""
    try:
        opcode, payload = await read_frame(reader)
    except asyncio.IncompleteReadError:
        raise ProbeFailed(RFB_BANNER, "the WebSocket closed before the VNC server spoke: websockify could not "
                                 "reach x11vnc (is it running and listening on localhost?)") from None
    if opcode == 0x8:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        raise ProbeFailed(RFB_BANNER, f"websockify closed the WebSocket (code {code}, "
                                 f"{payload[2:].decode(errors='replace')!r}) before the VNC server spoke")
    banner = payload.decode(errors="replace").strip()
    if not banner.startswith("RFB "):
        raise ProbeFailed(RFB_BANNER, f"expected an RFB banner, got {payload[:40]!r}")
    return banner


async def raw_rfb_banner(reader: asyncio.StreamReader) -> str:
    """The VNC server's protocol banner, read straight from its TCP connection (the rfb path)."""
    try:
        line = await reader.readexactly(12)  # "RFB xxx.yyy\n": RFC 6143 7.1.1
    except asyncio.IncompleteReadError as exc:
        raise ProbeFailed(RFB_BANNER, f"the VNC server closed the connection after {exc.partial[:12]!r}, before "
                                      "its banner (is x11vnc refusing this address?)") from None
    if not line.startswith(b"RFB "):
        raise ProbeFailed(RFB_BANNER, f"expected an RFB banner, got {line!r}")
    return line.decode(errors="replace").strip()
