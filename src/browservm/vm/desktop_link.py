"""A connection to a VM's desktop once TCP is up (readiness.connect_socket made it inside the VM
network's namespace), one of two kinds of leg (vm/desktop_path.py says which a VM uses):

    TcpLeg        RFB straight on TCP to the VNC server (the rfb path): bytes as they come, in pieces
                  of at most CHUNK bytes, the socket's reads kept as they are (no copy) and reading
                  stopped past READ_LIMIT (2 CHUNKs) held, so nothing the guest sends makes the
                  controller buffer much more
    WebSocketLeg  RFB inside a WebSocket to the guest's websockify (the websockify path): the
                  `websockets` client with compression off, no proxy, no redirects followed, the
                  response's headers bounded by the library and messages by `max_message`

Both present the same four calls; how the VM's side ended comes back as `UpstreamEnded`, with the
close code and reason a viewer gets, so neither the proxy's relay nor readiness's banner check
cares which kind it has. readiness.DesktopConnection opens them, for the readiness hops, the
doctor and the proxy alike.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidHandshake, InvalidStatus
from websockets.protocol import State
from websockets.typing import Subprotocol

from browservm.errors import ProbeFailed
from browservm.vm.hops import WS_UPGRADE

NORMAL = 1000
GOING_AWAY = 1001
INTERNAL_ERROR = 1011
CHUNK = 64 * 1024  # bytes per read from the guest: what one message to the viewer holds at most
WRITE_LIMIT = 64 * 1024  # bytes unsent towards the guest before a send waits
READ_LIMIT = 2 * CHUNK  # bytes from the guest waiting to be relayed before the rfb leg stops reading its socket


@dataclass(frozen=True)
class LegSettings:
    """How a leg behaves once open.

    keepalive      seconds; a VM that stops answering is dropped after about twice that (WebSocket
                   pings on the websockify path, TCP keepalive on the rfb path); None: not watched
    close_timeout  seconds a close may take before the connection is dropped
    max_message    bytes in one WebSocket message from the guest (a larger one fails the leg)
    queue_limit    WebSocket messages from the guest that may wait to be read before the leg stops
                   reading the socket
    """

    keepalive: float | None
    close_timeout: float
    max_message: int
    queue_limit: int


class UpstreamEnded(Exception):
    """The VM's side of the connection ended: `code` and `reason` for the viewer; `early` says it in
    the words of the RFB banner hop, for an end that came before the VNC server spoke."""

    def __init__(self, code: int, reason: str, early: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.early = early


class Leg(Protocol):
    silence: str  # what the VNC server saying nothing means, for the rfb.banner hop

    @property
    def closed(self) -> bool:
        """The VM's side is known to have ended (a prepared connection that can no longer be used)."""
        ...

    async def recv(self) -> bytes:
        """The next bytes from the VM, or UpstreamEnded."""
        ...

    async def send(self, data: bytes) -> None:
        """Send, waiting while WRITE_LIMIT bytes are unsent; UpstreamEnded if the VM's side is gone."""
        ...

    async def close(self, code: int) -> None:
        """End the connection (`code`: why, where the kind has close codes)."""
        ...

    def abort(self) -> None:
        """Drop the connection at once (the proxy's own cleanup when it is cancelled)."""
        ...


class _Guest(asyncio.Protocol):
    """The rfb path's socket as an asyncio protocol: what the guest sends is kept as the event loop's
    socket reads gave it (asyncio's StreamReader copied every byte into its buffer and again out of
    it: a third of the relay's work per byte, bench/viewer_bench.py) and reading stops once more than
    READ_LIMIT bytes wait; writes wait while the transport holds more than WRITE_LIMIT unsent."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # into the first of _chunks: what of it was read
        self._held = 0
        self._reading_paused = False
        self.eof = False
        self.error: OSError | None = None  # how the connection was lost, when it was by an error
        self.lost: asyncio.Future[None] = loop.create_future()
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None  # while the transport's write buffer is full

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._held += len(data)
        if self._held > READ_LIMIT and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake(self._readable)

    def eof_received(self) -> bool:
        self.eof = True
        self._wake(self._readable)
        return True  # half-closed, as asyncio's streams keep it: the relay closes it when it ends

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if isinstance(exc, OSError):
            self.error = exc
        elif exc is not None:
            self.error = ConnectionResetError(str(exc))
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake(self._readable)
        self._wake(self._writable)

    def pause_writing(self) -> None:
        if self._writable is None or self._writable.done():
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        self._wake(self._writable)

    @staticmethod
    def _wake(waiter: asyncio.Future[None] | None) -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def at_eof(self) -> bool:
        return self.eof and not self._chunks

    async def read(self) -> bytes:
        """At most CHUNK bytes, as soon as there are any; b"" at the end; OSError if the connection failed."""
        while not self._chunks:
            if self.error is not None:
                raise self.error
            if self.eof:
                return b""
            self._readable = self._loop.create_future()
            try:
                await self._readable
            finally:
                self._readable = None
        head = self._chunks[0]
        if self._offset == 0 and len(head) <= CHUNK:
            data = self._chunks.popleft()
        else:  # a socket read holds up to 256 KiB: it goes on in pieces of CHUNK, each copied once
            data = head[self._offset:self._offset + CHUNK]
            self._offset += len(data)
            if self._offset == len(head):
                self._chunks.popleft()
                self._offset = 0
        self._held -= len(data)
        if self._reading_paused and self._held <= READ_LIMIT and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("Connection lost")
        self.transport.write(data)
        if self._writable is not None and not self._writable.done():
            await self._writable
            if self.error is not None or self.lost.done():
                raise self.error or ConnectionResetError("Connection lost")


class TcpLeg:
    silence = "the VNC server is silent"

    def __init__(self, sock: socket.socket, guest: _Guest, transport: asyncio.Transport,
                 close_timeout: float) -> None:
        self._sock = sock
        self._guest = guest
        self._transport = transport
        self._close_timeout = close_timeout

    @property
    def closed(self) -> bool:
        if self._guest.at_eof or self._guest.error is not None or self._transport.is_closing():
            return True
        # The kernel knows of a close before the event loop has read it: ask it, consuming nothing.
        try:
            return self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    @classmethod
    async def open(cls, sock: socket.socket, settings: LegSettings) -> TcpLeg:
        """The connected `sock` on the event loop. With `settings.keepalive`, a VM that stops answering
        (frozen, or its network gone) is dropped after about twice that many seconds: TCP keepalive
        while the line is idle, TCP_USER_TIMEOUT while data waits for an acknowledgement."""
        if settings.keepalive is not None:
            seconds = max(1, round(settings.keepalive))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, seconds)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2000 * seconds)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # RFB is small messages both ways
        loop = asyncio.get_running_loop()
        guest = _Guest(loop)
        transport, _ = await loop.create_connection(lambda: guest, sock=sock)
        transport.set_write_buffer_limits(high=WRITE_LIMIT)
        return cls(sock, guest, transport, settings.close_timeout)

    async def recv(self) -> bytes:
        try:
            data = await self._guest.read()
        except OSError as exc:
            raise self._failed(exc) from None
        if not data:
            raise UpstreamEnded(NORMAL, "the VM's desktop closed the connection",
                                "the VNC server closed the connection before it spoke")
        return data

    async def send(self, data: bytes) -> None:
        try:
            await self._guest.write(data)
        except OSError as exc:
            raise self._failed(exc) from None

    async def close(self, code: int) -> None:
        self._transport.close()
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(self._guest.lost)
        except TimeoutError:
            self._transport.abort()

    def abort(self) -> None:
        self._transport.abort()

    @staticmethod
    def _failed(exc: OSError) -> UpstreamEnded:
        if exc.errno == errno.ETIMEDOUT:
            reason = "the VM stopped answering (TCP keepalive timed out)"
        else:
            reason = f"the connection to the VM failed: {exc.strerror or exc}"
        return UpstreamEnded(INTERNAL_ERROR, reason, reason)


class _NoRedirects(connect):
    """The websockets client, except that a redirect from the guest is an upgrade failure: a guest
    must not send the controller to another address."""

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc


class WebSocketLeg:
    silence = "the VNC server behind websockify is silent"

    def __init__(self, connection: ClientConnection, max_message: int) -> None:
        self._connection = connection
        self._max_message = max_message

    @property
    def closed(self) -> bool:
        return self._connection.state is not State.OPEN

    @classmethod
    async def open(cls, sock: socket.socket, url: str, settings: LegSettings, timeout: float | None) -> WebSocketLeg:
        """The WebSocket upgrade (ws.upgrade) over the connected `sock`: ProbeFailed if it is refused
        or not answered within `timeout` (None: the caller's deadline bounds it)."""
        connection = None
        try:
            connection = await _NoRedirects(
                url, sock=sock, proxy=None, compression=None, subprotocols=[Subprotocol("binary")],
                open_timeout=timeout, ping_interval=settings.keepalive, ping_timeout=settings.keepalive,
                close_timeout=settings.close_timeout, max_size=settings.max_message,
                max_queue=settings.queue_limit, write_limit=WRITE_LIMIT)
        except InvalidStatus as exc:
            response = exc.response
            raise ProbeFailed(WS_UPGRADE, f"expected 101 Switching Protocols, got {response.status_code} "
                                          f"{response.reason_phrase}") from None
        except (InvalidHandshake, OSError) as exc:  # TimeoutError among them: open_timeout's, or ETIMEDOUT
            if isinstance(exc, TimeoutError) and timeout is not None:
                raise ProbeFailed(WS_UPGRADE, f"no answer to the upgrade within {timeout:g} s") from None
            cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
            raise ProbeFailed(WS_UPGRADE, f"{exc}{cause}") from None
        finally:
            if connection is None:
                sock.close()  # the client aborts its transport on failure; this covers failing before one
        return cls(connection, settings.max_message)

    async def recv(self) -> bytes:
        try:
            return await self._connection.recv(decode=False)
        except ConnectionClosed as closed:
            raise self._ended(closed) from None

    async def send(self, data: bytes) -> None:
        try:
            await self._connection.send(data)
        except ConnectionClosed as closed:
            raise self._ended(closed) from None

    async def close(self, code: int) -> None:
        await self._connection.close(code)

    def abort(self) -> None:
        self._connection.transport.abort()

    def _ended(self, closed: ConnectionClosed) -> UpstreamEnded:
        said = f"{closed.rcvd.code} {closed.rcvd.reason!r}" if closed.rcvd is not None else "no close frame"
        early = f"websockify closed the WebSocket ({said}) before the VNC server spoke"
        if isinstance(closed, ConnectionClosedOK):
            reason = f": {closed.rcvd.reason}" if closed.rcvd is not None and closed.rcvd.reason else ""
            return UpstreamEnded(NORMAL, f"the VM's desktop closed the connection{reason}", early)
        if closed.sent is not None and closed.sent.code == 1009:
            too_big = f"the VM sent a message larger than {self._max_message} bytes"
            return UpstreamEnded(INTERNAL_ERROR, too_big, too_big)
        if closed.rcvd is not None:
            return UpstreamEnded(INTERNAL_ERROR, f"the VM's websockify closed the connection with {said}", early)
        if closed.sent is not None:
            return UpstreamEnded(INTERNAL_ERROR, "the connection to the VM failed: "
                                                 f"{closed.sent.reason or closed.sent.code}", early)
        return UpstreamEnded(INTERNAL_ERROR, "the connection to the VM broke without a close frame", early)
