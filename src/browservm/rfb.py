"""The RFB handshake the proxy makes on a viewer's behalf, so the VM's VNC password stays on the host.

Each VM's VNC server (Xvnc, or x11vnc) asks for that VM's own password (from its config disk): without it, any local
user of the host could open any desktop. Only the controller knows it, so the proxy speaks both
ends of the RFB handshake (RFC 6143, 7.1-7.2; 3.8, or 3.7 with a VM's server that speaks only
that: SERVER_VERSIONS) and then relays the rest untouched:

    VM's VNC server  <── client role: VNC authentication (DES of the challenge) ──  proxy
    proxy            ── server role: "no authentication" ──>  viewer (noVNC)

Everything the VM sends is bounded before it is used: the version line is 12 bytes, a failure
reason at most MAX_REASON bytes, a security list at most 255 types.

What the viewer sends after the handshake is checked as it streams past (`ClientMessages`): only
the client messages noVNC sends, each of its own size, a clipboard (ClientCutText) of at most
MAX_CUT_TEXT bytes, as the screen watcher bounds the guest's (vm/screen.py MAX_TEXT). Two kinds are
changed on the way, since a well-behaved viewer sends them: a clipboard is left out when the VM's
template takes no paste, and a SetDesktopSize is held until whole (at most 4 KiB) and its sizes
bounded to MIN_DESKTOP..MAX_DESKTOP before the guest sees it, since Xvnc takes any size up to
32768x32768 (a framebuffer of 4 GiB). Otherwise the checker only keeps count of where each message ends.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Awaitable, Callable

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

VERSION = b"RFB 003.008\n"
# The versions a VM's VNC server may announce, one set for readiness's banner check, the proxy and
# the screen judge (vm/screen.py): 3.8, x11vnc's, and 3.7, whose handshake differs only in a failed
# SecurityResult carrying no reason. RFC 6143 7.1.1 defines no others and says to read any other
# number as 3.3, whose handshake (the server picks the security type) none of them speaks.
SERVER_VERSIONS = frozenset({(3, 7), (3, 8)})
NO_AUTH, VNC_AUTH = 1, 2
MAX_REASON = 1024
_VERSION = re.compile(rb"RFB (\d{3})\.(\d{3})\n")


class HandshakeFailed(Exception):
    """The other side broke the handshake; the message says how, for a person."""


class MessageReader:
    """Exact reads out of a stream of messages (WebSocket frames split RFB anywhere)."""

    def __init__(self, receive: Callable[[], Awaitable[bytes]]) -> None:
        self._receive = receive
        self._buffer = bytearray()

    async def read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += await self._receive()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    def rest(self) -> bytes:
        """What came after the last read: the first bytes of the relay."""
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


def parse_version(line: bytes) -> tuple[int, int]:
    match = _VERSION.fullmatch(line)
    if match is None:
        raise HandshakeFailed(f"not an RFB version line: {line[:12]!r}")
    return int(match.group(1)), int(match.group(2))


def server_version(line: bytes) -> tuple[int, int]:
    """The version a VNC server's banner `line` announces; HandshakeFailed unless one of SERVER_VERSIONS."""
    major, minor = parse_version(line)
    if (major, minor) not in SERVER_VERSIONS:
        spoken = " and ".join(f"{a}.{b}" for a, b in sorted(SERVER_VERSIONS))
        raise HandshakeFailed(f"the VNC server speaks RFB {major}.{minor}; browservm speaks {spoken} with it")
    return major, minor


def _vnc_des(key: bytes, data: bytes) -> bytes:
    """DES-ECB of `data` as VNC does it: keyed by `key`'s 8 bytes with each byte's bits in reverse
    order (a quirk every VNC server expects)."""
    reversed_key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in key)
    # Three equal keys make single DES; ECB of one 16-byte challenge is what RFC 6143 7.2.2 specifies.
    encryptor = Cipher(TripleDES(reversed_key * 3), modes.ECB()).encryptor()  # noqa: S305
    return encryptor.update(data) + encryptor.finalize()


def vnc_response(password: str, challenge: bytes) -> bytes:
    """RFB's VNC authentication: the challenge encrypted with DES, keyed by the password's first 8 bytes."""
    return _vnc_des(password.encode()[:8].ljust(8, b"\0"), challenge)


# The key every VNC password file (vncpasswd's format, TigerVNC's -PasswordFile) is encrypted with:
# it only keeps the password from being read at a glance.
_PASSWORD_FILE_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])


def vnc_password_file(password: str) -> bytes:
    """What `vncpasswd -f` writes for `password`: its first 8 bytes, DES-encrypted with the fixed key.
    Made on the host, which has DES, for a guest that has only the standard library."""
    return _vnc_des(_PASSWORD_FILE_KEY, password.encode()[:8].ljust(8, b"\0"))


async def _reason(reader: MessageReader) -> str:
    (length,) = struct.unpack(">I", await reader.read(4))
    if length > MAX_REASON:
        return f"(a reason of {length} bytes, not read)"
    return (await reader.read(length)).decode(errors="replace")


async def authenticate(reader: MessageReader, send: Callable[[bytes], Awaitable[None]], version: bytes,
                       password: str) -> None:
    """Client role, after the server's `version` line was read: VNC authentication with `password`
    up to a successful SecurityResult. The server then waits for the viewer's ClientInit."""
    _, minor = server_version(version)
    await send(version)  # the server's own: the client answers with the version both use
    (count,) = await reader.read(1)
    if count == 0:
        raise HandshakeFailed(f"the VNC server refused the connection: {await _reason(reader)}")
    offered = await reader.read(count)
    if VNC_AUTH not in offered:
        # A desktop without its password would be open to every local user: not one to show.
        raise HandshakeFailed(f"the VNC server does not ask for the VM's password (it offers security types "
                              f"{list(offered)}); the image's desktop is not browservm's")
    await send(bytes([VNC_AUTH]))
    await send(vnc_response(password, await reader.read(16)))
    (result,) = struct.unpack(">I", await reader.read(4))
    if result != 0:
        said = await _reason(reader) if minor >= 8 else "no reason given"
        raise HandshakeFailed(f"the VNC server refused the VM's password: {said}")


async def greet(reader: MessageReader, send: Callable[[bytes], Awaitable[None]]) -> None:
    """Server role towards the viewer: RFB 3.3, 3.7 or 3.8 as it asks, with no authentication."""
    await send(VERSION)
    major, minor = parse_version(await reader.read(12))
    if major != 3 or minor < 3:
        raise HandshakeFailed(f"the viewer asked for RFB {major}.{minor}")
    if minor < 7:
        await send(struct.pack(">I", NO_AUTH))  # 3.3: the server chooses, and says nothing more
        return
    await send(bytes([1, NO_AUTH]))
    (chosen,) = await reader.read(1)
    if chosen != NO_AUTH:
        raise HandshakeFailed(f"the viewer chose security type {chosen}; only {NO_AUTH} (none) is offered")
    if minor >= 8:
        await send(struct.pack(">I", 0))


MAX_CUT_TEXT = 1 << 20  # a viewer's clipboard, as vm/screen.py bounds the guest's
# The desktop sizes a viewer may ask for (SetDesktopSize), each side bounded on its own: a window
# larger or smaller gets the nearest size inside (noVNC then scales or scrolls).
MIN_DESKTOP = (800, 600)
MAX_DESKTOP = (2560, 1600)
SET_DESKTOP_SIZE = 251
CLIPBOARD = 6
MAX_ENCODINGS = 1024  # in one SetEncodings: noVNC sends some thirty
# Client message types (RFC 6143 7.5, and the extensions noVNC speaks): how many bytes, the type
# byte included, say how long a message is (for the fixed ones, the whole message).
_HEADERS: dict[int, int] = {
    0: 20,  # SetPixelFormat
    2: 4,  # SetEncodings, then 4 bytes per encoding
    3: 10,  # FramebufferUpdateRequest
    4: 8,  # KeyEvent
    5: 6,  # PointerEvent
    6: 8,  # ClientCutText, then its text
    150: 10,  # EnableContinuousUpdates
    248: 9,  # ClientFence, then its payload (at most 64 bytes by the extension)
    250: 4,  # xvp
    251: 8,  # SetDesktopSize, then 16 bytes per screen
    255: 2,  # QEMU: the extended key event (subtype 0), 12 bytes in all
}


class ViewerBroke(Exception):
    """The viewer sent what no RFB viewer sends, or a clipboard over the bound; `too_big` tells which."""

    def __init__(self, reason: str, too_big: bool = False) -> None:
        super().__init__(reason)
        self.too_big = too_big


def _bounded(size: int, side: int) -> int:
    return max(MIN_DESKTOP[side], min(MAX_DESKTOP[side], size))


def bound_desktop_size(message: bytes) -> bytes:
    """A whole SetDesktopSize with its width and height, and each screen's, within MIN_DESKTOP..MAX_DESKTOP
    (a screen's also within the desktop it is on)."""
    out = bytearray(message)
    width, height = _bounded(int.from_bytes(out[2:4]), 0), _bounded(int.from_bytes(out[4:6]), 1)
    out[2:6] = struct.pack(">HH", width, height)
    for screen in range(8, len(out), 16):  # id(4) x(2) y(2) width(2) height(2) flags(4)
        x, y, w, h = struct.unpack_from(">HHHH", out, screen + 4)
        struct.pack_into(">HH", out, screen + 8, max(1, min(_bounded(w, 0), width - min(x, width - 1))),
                         max(1, min(_bounded(h, 1), height - min(y, height - 1))))
    return bytes(out)


class ClientMessages:
    """The viewer's side of an RFB session after the security handshake, followed message by message:
    ClientInit (one byte), then client messages. `feed` each piece as it passes and relay what it
    returns; ViewerBroke when one is not acceptable. `paste`: whether the viewer's clipboard reaches the
    VM (else its ClientCutText messages, classic or extended, are left out). Keeps at most one message
    header (24 bytes) and one SetDesktopSize (8 + 16 * 255 bytes), which it relays once whole, bounded."""

    def __init__(self, *, paste: bool = True) -> None:
        self._paste = paste
        self._head = bytearray()
        self._rest = 1  # ClientInit: its one byte
        self._held: bytearray | None = None  # a SetDesktopSize not yet whole
        self._leaving_out = False  # the message passing is a clipboard this VM takes no paste of
        self.left_out = 0  # clipboards left out, for the log

    def feed(self, data: bytes) -> bytes:
        """What to relay of `data`: all of it as it comes, but a clipboard the VM takes no paste of, and a
        SetDesktopSize once whole and bounded."""
        out = bytearray()
        at = 0
        while at < len(data):
            if self._rest:
                step = min(self._rest, len(data) - at)
                if not self._leaving_out:
                    (out if self._held is None else self._held).extend(data[at:at + step])
                self._rest -= step
                at += step
                self._release(out)
                continue
            if not self._head:  # a message begins: its type says where its bytes go
                self._leaving_out = data[at] == CLIPBOARD and not self._paste
                self.left_out += self._leaving_out
            self._head.append(data[at])
            if self._head[0] != SET_DESKTOP_SIZE and not self._leaving_out:
                out.append(data[at])
            at += 1
            total = self._length(bytes(self._head))
            if total is not None:
                if self._head[0] == SET_DESKTOP_SIZE:
                    self._held = bytearray(self._head)
                self._rest = total - len(self._head)
                self._head.clear()
                self._release(out)
        return bytes(out)

    def _release(self, out: bytearray) -> None:
        if self._held is not None and not self._rest:
            out += bound_desktop_size(bytes(self._held))
            self._held = None

    def _length(self, head: bytes) -> int | None:
        """The whole message's length once `head` says it; None while more of the header is needed."""
        kind = head[0]
        if kind not in _HEADERS:
            raise ViewerBroke(f"the viewer sent RFB client message type {kind}, which no viewer of this proxy "
                              "sends")
        header = _HEADERS[kind]
        if kind == 255 and len(head) == 2:
            if head[1] != 0:
                raise ViewerBroke(f"the viewer sent QEMU client message subtype {head[1]}; only the extended key "
                                  "event (0) is relayed")
            return 12
        if len(head) < header:
            return None
        if kind == 2:
            count = int.from_bytes(head[2:4])
            if count > MAX_ENCODINGS:
                raise ViewerBroke(f"the viewer asked for {count} encodings (at most {MAX_ENCODINGS})")
            return header + 4 * count
        if kind == 6:
            length = int.from_bytes(head[4:8], signed=True)  # negative: an extended clipboard message of -length
            if abs(length) > MAX_CUT_TEXT:
                raise ViewerBroke(f"the viewer's clipboard is {abs(length)} bytes (at most {MAX_CUT_TEXT})",
                                  too_big=True)
            return header + abs(length)
        if kind == 248:
            return header + head[8]
        if kind == 251:
            return header + 16 * head[6]
        return header
