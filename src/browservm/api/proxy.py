"""The relay between a person's browser (noVNC, over a WebSocket) and a VM's desktop.

    browser ──WS /v1/vms/{id}/vnc──► uvicorn ─ ViewerProxy.serve ──TCP opened in the VM network's
                                                                    namespace──► VM :5901 Xvnc (RFB)
                                                                             or  VM :6080 websockify (WS)

Which of the two a VM uses is its record's desktop path (vm/desktop_path.py); `Upstream.websocket`
carries it here. The connection is opened as the readiness probes open theirs
(readiness.DesktopConnection, on vm/desktop_link.py's two kinds of leg).

The route hands `serve` the WebSocket before it checks anything; its checks go in `resolve`.
`serve` does, in this order:

1. Accept the WebSocket, echoing the `binary` subprotocol when the browser offers it. Always first:
   a browser cannot see why a handshake was refused (it reports 1006, the symptom of the incident
   in ../shared/seeds/), so every refusal is a close with a code and a reason the page can show.
2. `await resolve()`: the route's own checks (token, VM lookup). It returns the `Upstream` or raises
   `Refused(code, reason)`.
3. The last readiness hops, each with `connect_timeout`: net.tcp (a TCP connection made inside
   the VM network's namespace), ws.upgrade (answered with 101; websockify's path only), rfb.banner
   (the VNC server's first bytes; RFB servers speak first); then, when the Upstream carries the VM's
   VNC password, rfb.auth: the proxy authenticates to the VM and offers the viewer no
   authentication (browservm.rfb), so the password never leaves the host. A failure closes
   with 4502 and "<hop>: <reason>", hop names from browservm.vm.hops.
4. The relay, until one side ends it.

Close codes sent to the viewer (`serve` returns the code; when the viewer itself left, the code it
closed with, or 1005/1006):

    4401 4404 4409  whatever the route's `Refused` says (bad token, unknown VM, VM not ready)
    4429            too many viewers: the VM has MAX_VIEWERS_PER_VM, or the link MAX_VIEWERS_PER_LINK (the route's)
    4502            a hop to the VM failed before the relay started: "net.tcp: ...", "ws.upgrade: ...",
                    "rfb.banner: ...", "rfb.auth: ..."
    1002            the viewer broke the RFB handshake the proxy offered it (or left it unanswered
                    for `connect_timeout`), or then sent a client message no viewer sends
                    (rfb.ClientMessages)
    4410            `ended` was set: the VM was deleted or died ("the VM was deleted", or `Ended.reason`)
    1000            the VM's desktop ended the connection normally (its VNC server closed it, or websockify
                    closed the WebSocket because the VNC server exited)
    1011            the connection to the VM failed mid-stream (reset, no close frame, a message over
                    `max_message`, keepalive timeout), or the controller failed (logged)
    1001            `shutdown()`: "the controller is shutting down"
    1003            the browser sent a text frame: RFB is binary and websockify itself refuses text
                    frames with 1003, so the proxy refuses them first, with a reason the page shows
    1009            the browser sent a message over VIEWER_MAX_MESSAGE (uvicorn closes it; `serve`
                    returns the code), or a clipboard over rfb.MAX_CUT_TEXT (1 MiB)

Reasons are cut to the 123 UTF-8 bytes a close frame can carry (`close_reason`).

Flow control. Each connection has two pumps, one per direction, and each awaits its send before it
reads the next message from the other side; nothing else queues. A slow viewer therefore stops the
upstream pump, the websockets client stops reading once `queue_limit` frames wait, and the guest's
TCP window closes; a slow guest stops the viewer pump, and uvicorn stops reading from the browser
after each message until the app takes it. What a viewer can hold in the controller is about
`queue_limit` + 2 messages per direction plus the 64 KiB write buffers; websockify sends at most
64 KiB per message, so about half a MiB, and `max_message` bounds what a hostile guest can make it
(tests/unit/test_proxy.py measures it). From the viewer, uvicorn takes messages of at most
VIEWER_MAX_MESSAGE (64 KiB: RFB client messages are small, and noVNC sends even a clipboard in
10 KiB pieces) and stops reading after each until the app took it; with 16 MiB messages a viewer
whose guest stopped reading made the controller hold ~60 MiB (issue 18). And the route caps
viewers per VM and per link (4429), so many connections cannot add up either. On the rfb path
the guest's bytes wait as the socket's reads gave them (desktop_link.TcpLeg, no copy), reading
stops past READ_LIMIT, 128 KiB (at most one 256 KiB socket read more), and they go on 64 KiB at
a time when the viewer took the last: under 0.5 MiB per viewer.

Measured by bench/proxy_bench.py on 2 shared, saturated cores: 0.6-1.1 CPU s/GiB in the controller
per direction, +0.1-0.2 ms median per round trip, about 50 KiB of RSS per idle viewer. On the rfb
path to x11vnc (the minimal image's VNC server; Xvnc's, the full and oauth images', is not
measured yet), by bench/viewer_bench.py against a viewer straight to the same x11vnc (its own
WebSocket), same run, the otherwise idle 2 cores: 0.61-0.72x its throughput of full Raw frames, the
controller at 0.75-0.9 CPU s/GiB, +0.14-0.20 ms median on a message x11vnc answers at once, +0.4-0.9 ms
p50 from a key press to its echo's pixels (28-33 ms, x11vnc's own cycle). The plainest relay process
(two threads, recv_into and sendall) gets the same MiB/s there at a third of the CPU: on 2 cores the
extra process, not its work per byte, is the gap (DESIGN.md).

Nothing from the guest is trusted for sizes: messages are bounded by `max_message` (a larger one
fails the connection with 1009 upstream and 1011 to the viewer), the upgrade and the banner by
`connect_timeout`, redirects are not followed, and a guest that stops answering is dropped (by
WebSocket pings on the websockify path, by TCP keepalive on the rfb path).
Text frames from the guest are relayed as binary: the RFB stream is bytes, the frame type means
nothing to it.

Keepalive. Starlette's WebSocket cannot send pings; uvicorn sends them to the browser itself
(`ws_ping_interval`, `ws_ping_timeout`, 20 s each by default) and closes a browser that does not
answer. `ping_interval` here is the upstream leg's: the websockets client pings the guest's
websockify that often and fails the relay (1011) if no pong comes within the same interval; on
the rfb path TCP keepalive does the same. A frozen VM does not keep an idle viewer open forever.

What the service must configure in uvicorn (uvicorn.Config / command-line flags):

    ws_per_message_deflate=False   browsers offer permessage-deflate and uvicorn accepts it by
                                   default; on a VNC stream that costs ~54 CPU s/GiB
                                   (../shared/LAB-NOTES.md), some 50 times the relay itself.
                                   The upstream leg has it off here.
    ws_ping_interval, ws_ping_timeout   keep them set (the defaults, 20 s, are right): they are the
                                   only pings the browser leg gets.
    ws_max_size                    the browser leg's message limit: VIEWER_MAX_MESSAGE (uvicorn's
                                   default, 16 MiB, let a viewer make the controller hold 60 MiB).
                                   UVICORN_WEBSOCKETS holds these settings; serve and the tests use it.
    shutdown order                 uvicorn's own shutdown closes every WebSocket with 1012 before the
                                   lifespan shutdown runs, so call `await proxy.shutdown()` before
                                   that (e.g. in an override of uvicorn.Server.shutdown), or viewers
                                   see 1012 instead of 1001.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any, Literal, Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect

from browservm import rfb
from browservm.errors import ProbeFailed
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.desktop_link import GOING_AWAY, INTERNAL_ERROR, NORMAL, Leg, LegSettings, UpstreamEnded
from browservm.vm.hops import RFB_AUTH, RFB_BANNER
from browservm.vm.readiness import DesktopConnection

log = logging.getLogger(__name__)

# Close codes of the viewer WebSocket, one list for the route, the proxy and the viewer page.
BAD_TOKEN = 4401
UNKNOWN_VM = 4404
VM_NOT_READY = 4409
VM_ENDED = 4410
VM_UNREACHABLE = 4502
TOO_MANY_VIEWERS = 4429
PROTOCOL_ERROR = 1002
MESSAGE_TOO_BIG = 1009
UNSUPPORTED_DATA = 1003

SHUTTING_DOWN = "the controller is shutting down"
VM_DELETED = "the VM was deleted"
MAX_REASON_BYTES = 123  # RFC 6455 5.5: control frames carry 125 bytes, 2 of them the code
MAX_VIEWERS_PER_VM = 8  # viewers of one VM at once (the route refuses more with TOO_MANY_VIEWERS)
MAX_VIEWERS_PER_LINK = 4  # viewers of one viewer token at once
VIEWER_MAX_MESSAGE = 64 * 2**10  # the largest WebSocket message a viewer may send
# uvicorn's WebSocket settings for the viewer leg (see "What the service must configure" above).
UVICORN_WEBSOCKETS: dict[str, Any] = {"ws_per_message_deflate": False, "ws_max_size": VIEWER_MAX_MESSAGE,
                                      "ws_ping_interval": 20.0, "ws_ping_timeout": 20.0}

Direction = Literal["to_vm", "to_viewer"]


def close_reason(text: str) -> str:
    """`text` as a close reason: at most 123 UTF-8 bytes, cut between characters, marked with "…"."""
    encoded = text.encode()
    if len(encoded) <= MAX_REASON_BYTES:
        return text
    return encoded[:MAX_REASON_BYTES - len("…".encode())].decode(errors="ignore") + "…"


@dataclass(frozen=True)
class Upstream:
    """Where a VM's desktop is: an address in the VM network, reached from inside `netns`, a port,
    and whether RFB goes inside a WebSocket there (websockify) or straight on TCP (the VNC server); and
    the VM's VNC password, when its desktop has one (the proxy then authenticates for the viewer)."""

    netns: NetworkNamespace
    address: IPv4Address
    port: int
    path: str = "/websockify"  # the WebSocket's, when `websocket`
    vnc_password: str | None = field(default=None, repr=False)
    websocket: bool = field(kw_only=True)  # no default: every caller says which desktop path
    paste: bool = field(default=True, kw_only=True)  # whether the viewer's clipboard reaches the VM (rfb path)
    key: str = ""  # which prepared connection it may take (ViewerProxy.prepare): the VM's id


class Refused(Exception):
    """Raised by the route's resolve(): close the accepted WebSocket with `code` and `reason`."""

    def __init__(self, code: int, reason: str) -> None:
        if not 3000 <= code <= 4999:
            raise ValueError(f"a refusal's close code is an application code, 3000-4999 (got {code})")
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


class Ended(asyncio.Event):
    """The `ended` to give `serve`: one per VM, shared by its viewers; `end(reason)` closes them all
    with 4410 and that reason. A plain asyncio.Event works too, with the reason "the VM was deleted"."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = VM_DELETED

    def end(self, reason: str) -> None:
        self.reason = reason
        self.set()


class ProxyEvents(Protocol):
    """What the service counts. Called on the event loop: must neither block nor raise."""

    def opened(self) -> None:
        """A viewer's WebSocket was accepted; every `opened` is followed by one `closed`."""

    def closed(self, code: int) -> None:
        """That WebSocket ended, with the code `serve` returns (refusals and failures included)."""

    def bytes(self, direction: Direction, n: int) -> None:
        """One message of `n` bytes was relayed; called after the send completed."""


class NoEvents:
    """The default ProxyEvents: counts nothing."""

    def opened(self) -> None:
        pass

    def closed(self, code: int) -> None:
        pass

    def bytes(self, direction: Direction, n: int) -> None:
        pass


@dataclass(frozen=True)
class _Close:
    """How one viewer's connection ends: the code and reason it is closed with."""

    code: int
    reason: str
    viewer_gone: bool = False  # the viewer closed or vanished first: nothing to send it


@dataclass(eq=False)  # kept in a set: identity, not field values
class _Viewer:
    """Everything of one connection; nothing is shared between connections but the proxy's set of them."""

    websocket: WebSocket
    stop: asyncio.Future[None]  # resolved by shutdown()
    done: asyncio.Event = field(default_factory=asyncio.Event)
    upstream: Leg | None = None


def _retrieved(task: asyncio.Task[tuple[Leg, bytes]]) -> None:
    """A prepared connection that failed is only a missed head start: the viewer connects itself."""
    if not task.cancelled() and task.exception() is not None:
        log.info("a prepared desktop connection failed: %s", task.exception())


def _discard(task: asyncio.Task[tuple[Leg, bytes]]) -> None:
    # Cancelling closes what _open made, unless the cancel comes too late: when the task is done, or
    # when code it awaits swallows the cancel (asyncio.wait_for in Debian's Python 3.11.2 did).
    task.add_done_callback(_abort_made)
    task.cancel()


def _abort_made(task: asyncio.Task[tuple[Leg, bytes]]) -> None:
    if not task.cancelled() and task.exception() is None:
        task.result()[0].abort()


class _Ends(Exception):
    """How the viewer's side ended, found while reading from it."""

    def __init__(self, close: _Close) -> None:
        super().__init__(close.reason)
        self.close = close


def _data_or_end(message: Any) -> bytes:
    """The bytes of one message from the viewer, or _Ends: it left, or sent text."""
    if message["type"] == "websocket.disconnect":
        raise _Ends(_Close(message.get("code", 1005), message.get("reason") or "the viewer left", viewer_gone=True))
    data = message.get("bytes")
    if data is None:
        raise _Ends(_Close(UNSUPPORTED_DATA, "text frames are not relayed: the desktop speaks binary (RFB)"))
    assert isinstance(data, bytes)
    return data


class ViewerProxy:
    """Relays viewers' WebSockets to their VMs' desktops; see the module's docstring.

    `queue_limit` is how many frames from websockify may wait for a slow viewer before the controller
    stops reading from the guest (the websockets client's `max_queue`).
    """

    def __init__(self, events: ProxyEvents | None = None, *, ping_interval: float = 20.0,
                 connect_timeout: float = 10.0, max_message: int = 16 * 2**20, queue_limit: int = 4,
                 close_timeout: float = 5.0) -> None:
        self._events: ProxyEvents = events if events is not None else NoEvents()
        self._connect_timeout = connect_timeout
        self._close_timeout = close_timeout
        self._legs = LegSettings(keepalive=ping_interval, close_timeout=close_timeout, max_message=max_message,
                                 queue_limit=queue_limit)
        self._viewers: set[_Viewer] = set()
        self._warm: dict[str, asyncio.Task[tuple[Leg, bytes]]] = {}
        self._shutting_down = False

    @property
    def viewers(self) -> int:
        """How many viewers are connected (or being connected) now."""
        return len(self._viewers)

    async def serve(self, websocket: WebSocket, resolve: Callable[[], Awaitable[Upstream]],
                    ended: asyncio.Event) -> int:
        """Accept, check, connect and relay one viewer until it ends; the close code used."""
        offered = websocket.scope.get("subprotocols", [])
        await websocket.accept(subprotocol="binary" if "binary" in offered else None)
        self._events.opened()
        viewer = _Viewer(websocket, asyncio.get_running_loop().create_future())
        self._viewers.add(viewer)
        if self._shutting_down:
            viewer.stop.set_result(None)
        code = INTERNAL_ERROR
        work = asyncio.create_task(self._connect_and_relay(viewer, resolve))
        ending = asyncio.create_task(ended.wait())
        try:
            waits: set[asyncio.Future[Any]] = {work, ending, viewer.stop}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if work.done():
                outcome = work.result()
            else:
                work.cancel()
                await asyncio.wait({work})
                if ending.done():
                    outcome = _Close(VM_ENDED, ended.reason if isinstance(ended, Ended) else VM_DELETED)
                else:
                    outcome = _Close(GOING_AWAY, SHUTTING_DOWN)
            code = outcome.code
            await self._finish(viewer, outcome)
        finally:
            work.cancel()
            ending.cancel()
            if viewer.upstream is not None:
                # Only does anything when serve itself was cancelled before _finish closed it.
                viewer.upstream.abort()
            self._viewers.discard(viewer)
            viewer.done.set()
            self._events.closed(code)
        return code

    def prepare(self, key: str, upstream: Callable[[], Awaitable[Upstream]], *, within: float | None = None) -> None:
        """Connect to a desktop now, authenticated, for its next viewer (the one whose Upstream has
        this `key`), which then skips the connection: under emulation x11vnc takes 0.2-0.3 s to
        answer one. For a VM whose viewer comes in a moment (a claimed pooled VM's: its user is
        loading the viewer page). Not long before: x11vnc answered the first update request on a
        connection made 10 s before 5 or 10 s late. Replaces an earlier one. `within`: closed
        unless a viewer takes it within that many seconds; None: kept until taken or dropped."""
        if self._shutting_down:
            return
        self.drop(key)

        async def connect() -> tuple[Leg, bytes]:
            return await self._open(await upstream())

        task = asyncio.create_task(connect())
        task.add_done_callback(_retrieved)
        self._warm[key] = task
        if within is not None:
            # No viewer in time: an unused connection holds the VM's VNC server, and memory here.
            asyncio.get_running_loop().call_later(within, self._expire, key, task)

    def _expire(self, key: str, task: asyncio.Task[tuple[Leg, bytes]]) -> None:
        if self._warm.get(key) is task:
            self.drop(key)

    def drop(self, key: str) -> None:
        """Forget (and close) the connection prepared for `key`, if there is one."""
        task = self._warm.pop(key, None)
        if task is not None:
            _discard(task)

    async def _take_prepared(self, key: str) -> tuple[Leg, bytes] | None:
        """The prepared connection for `key` (awaited if still being made) when it succeeded and is
        still open; else None (and it is gone)."""
        task = self._warm.pop(key, None) if key else None
        if task is None:
            return None
        try:
            leg, first = await asyncio.shield(task)
        except asyncio.CancelledError:
            _discard(task)  # no one else will take it
            raise
        except Exception:  # it failed (logged by _retrieved): the viewer connects itself, and says why if it fails too
            return None
        if leg.closed:
            leg.abort()
            return None
        return leg, first

    async def shutdown(self) -> None:
        """Close every viewer with 1001 "the controller is shutting down" and wait until each is closed;
        viewers that connect from now on are closed the same way."""
        self._shutting_down = True
        for key in list(self._warm):
            self.drop(key)
        viewers = list(self._viewers)
        for viewer in viewers:
            if not viewer.stop.done():
                viewer.stop.set_result(None)
        await asyncio.gather(*(viewer.done.wait() for viewer in viewers))

    async def _connect_and_relay(self, viewer: _Viewer, resolve: Callable[[], Awaitable[Upstream]]) -> _Close:
        try:
            try:
                upstream = await resolve()
            except Refused as refused:
                return _Close(refused.code, refused.reason)
            prepared = await self._take_prepared(upstream.key)
            try:
                viewer.upstream, first = prepared or await self._open(upstream)
            except ProbeFailed as failed:
                return _Close(VM_UNREACHABLE, f"{failed.hop}: {failed.reason}")
            if upstream.vnc_password is not None:
                try:
                    await self._greet(viewer)
                except _Ends as ends:
                    return ends.close
            # The viewer's messages are followed where the proxy spoke its handshake (always, with a password).
            messages = rfb.ClientMessages(paste=upstream.paste) if upstream.vnc_password is not None else None
            try:
                return await self._relay(viewer, first, messages)
            finally:
                if messages is not None and messages.left_out:
                    log.info("viewer of %s: %d clipboard(s) left out (its VM takes no paste)", upstream.key,
                             messages.left_out)
        except Exception:
            # A bug, or resolve() failing other than by Refused: the viewer learns that much, the log the rest.
            log.exception("viewer proxy failed")
            return _Close(INTERNAL_ERROR, "the controller failed; its log says why")

    async def _open(self, upstream: Upstream) -> tuple[Leg, bytes]:
        """The leg to the VM, past its handshake, and what the VM sent that the viewer has not had yet.
        Closed again on any failure (or cancellation)."""
        timeout = self._connect_timeout
        connection = await DesktopConnection.open(upstream.netns, upstream.address, upstream.port, timeout,
                                                  websocket=upstream.websocket, ws_path=upstream.path,
                                                  settings=self._legs)
        try:
            if upstream.websocket:
                await connection.upgrade(timeout)
            return connection.leg, await self._handshake(connection, upstream)
        except BaseException:
            connection.close()
            raise

    async def _handshake(self, connection: DesktopConnection, upstream: Upstream) -> bytes:
        """rfb.banner within connect_timeout, then rfb.auth when there is a password."""
        timeout = self._connect_timeout
        leg, reader = connection.leg, connection.reader
        through = " through the WebSocket" if upstream.websocket else ""
        try:
            async with asyncio.timeout(timeout):
                await connection.banner()
        except TimeoutError:
            raise ProbeFailed(RFB_BANNER, f"nothing came{through} within {timeout:g} s: {leg.silence}") from None
        if upstream.vnc_password is None:
            return connection.version + reader.rest()
        try:
            async with asyncio.timeout(timeout):
                await rfb.authenticate(reader, leg.send, connection.version, upstream.vnc_password)
        except rfb.HandshakeFailed as exc:
            raise ProbeFailed(RFB_AUTH, str(exc)) from None
        except TimeoutError:
            raise ProbeFailed(RFB_AUTH, f"the VNC server did not finish authentication within {timeout:g} s") from None
        except UpstreamEnded:
            raise ProbeFailed(RFB_AUTH, "the VNC server closed the connection during authentication") from None
        return reader.rest()

    async def _greet(self, viewer: _Viewer) -> None:
        """The viewer's side of the handshake: RFB with no authentication (the proxy did it)."""
        websocket = viewer.websocket

        async def receive() -> bytes:
            return _data_or_end(await websocket.receive())

        try:
            async with asyncio.timeout(self._connect_timeout):
                await rfb.greet(rfb.MessageReader(receive), websocket.send_bytes)
        except rfb.HandshakeFailed as exc:
            raise _Ends(_Close(PROTOCOL_ERROR, str(exc))) from None
        except TimeoutError:
            raise _Ends(_Close(PROTOCOL_ERROR, "the viewer did not answer the RFB handshake within "
                                               f"{self._connect_timeout:g} s")) from None
        except WebSocketDisconnect as gone:
            raise _Ends(_Close(gone.code, "the viewer left", viewer_gone=True)) from None

    async def _relay(self, viewer: _Viewer, first: bytes, messages: rfb.ClientMessages | None) -> _Close:
        """Both directions at once until one ends; how the connection ends. `first`: what the VM
        sent that the viewer has not had yet; `messages`: the check of what the viewer sends."""
        upstream = viewer.upstream
        assert upstream is not None
        if first:
            try:
                await viewer.websocket.send_bytes(first)
            except WebSocketDisconnect as gone:
                return _Close(gone.code, "the viewer left", viewer_gone=True)
            self._events.bytes("to_viewer", len(first))
        pumps = {asyncio.create_task(self._viewer_to_vm(viewer.websocket, upstream, messages)),
                 asyncio.create_task(self._vm_to_viewer(viewer.websocket, upstream))}
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.wait(pumps)
        outcomes = [pump.result() for pump in done]
        # Both can end at once (the viewer left while the guest closed): a viewer that is gone gets nothing.
        return next((outcome for outcome in outcomes if outcome.viewer_gone), outcomes[0])

    async def _viewer_to_vm(self, websocket: WebSocket, upstream: Leg, messages: rfb.ClientMessages | None) -> _Close:
        while True:
            try:
                data = _data_or_end(await websocket.receive())
            except _Ends as ends:
                return ends.close
            if messages is not None:
                try:
                    data = messages.feed(data)  # a clipboard left out, a SetDesktopSize bounded once whole
                except rfb.ViewerBroke as broke:
                    return _Close(MESSAGE_TOO_BIG if broke.too_big else PROTOCOL_ERROR, str(broke))
                if not data:
                    continue  # all of it was held (part of a SetDesktopSize) or left out
            try:
                await upstream.send(data)  # waits while the upstream's write buffer is over WRITE_LIMIT
            except UpstreamEnded as ended:
                return _Close(ended.code, ended.reason)
            self._events.bytes("to_vm", len(data))

    async def _vm_to_viewer(self, websocket: WebSocket, upstream: Leg) -> _Close:
        while True:
            try:
                data = await upstream.recv()
            except UpstreamEnded as ended:
                return _Close(ended.code, ended.reason)
            try:
                await websocket.send_bytes(data)  # uvicorn waits while its write buffer is over 64 KiB
            except WebSocketDisconnect as gone:
                return _Close(gone.code, "the viewer left", viewer_gone=True)
            except RuntimeError:
                # uvicorn's answer to a send after it closed the connection itself (its ping timeout)
                return _Close(1006, "the viewer stopped answering", viewer_gone=True)
            self._events.bytes("to_viewer", len(data))

    async def _finish(self, viewer: _Viewer, outcome: _Close) -> None:
        """Close both legs at once, each within close_timeout."""
        closing = []
        if not outcome.viewer_gone:
            closing.append(self._close_viewer(viewer.websocket, outcome))
        if viewer.upstream is not None:
            leaving = outcome.viewer_gone or outcome.code == GOING_AWAY
            closing.append(viewer.upstream.close(GOING_AWAY if leaving else NORMAL))
        await asyncio.gather(*closing)

    async def _close_viewer(self, websocket: WebSocket, outcome: _Close) -> None:
        try:
            async with asyncio.timeout(self._close_timeout):
                await websocket.close(outcome.code, close_reason(outcome.reason))
        except (WebSocketDisconnect, RuntimeError):
            pass  # it left, or uvicorn closed it (ping timeout), while we were closing
        except TimeoutError:
            # A viewer that reads nothing keeps uvicorn's write buffer full, and uvicorn waits for
            # room before it writes a close; its own ping timeout ends that connection.
            log.info("viewer did not take its close (%d) within %g s", outcome.code, self._close_timeout)
