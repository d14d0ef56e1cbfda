"""One desktop connection for readiness, the proxy and the screen judge (issue 19).

readiness.DesktopConnection opens the VM's desktop for the readiness hops, the doctor and the
proxy alike; these tests hold readiness's answers against the proxy's on the same servers: a VM is
ready exactly when a viewer could be relayed to it, and a failure names the same hop with the same
reason. Real servers on loopback (asyncio TCP servers, the `websockets` server, hand-written HTTP);
NetworkNamespace(None) is the test's own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.utils import accept_key

from browservm import rfb
from browservm.api.proxy import Upstream, ViewerProxy
from browservm.errors import ProbeFailed
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.readiness import PROBE, DesktopConnection, desktop_banner
from browservm.vm.screen import ScreenError, wait_browser_on_screen
from tests.unit.test_proxy import (
    LOCALHOST,
    close_of,
    controller,
    rfb_at,
    tcp_upstream,
    to,
    websocket_upstream,
    within,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# Version lines a server might send: RFC 6143 7.1.1 defines 3.3, 3.7 and 3.8; Apple's servers say
# 3.889, and a number past 3.8 is to be read as 3.3.
ACCEPTED = [b"RFB 003.008\n", b"RFB 003.007\n"]
REFUSED = [b"RFB 003.003\n", b"RFB 003.889\n", b"RFB 004.001\n", b"HTTP/1.1 400"]


def probe(upstream: Upstream, timeout: float = 5.0) -> Awaitable[str]:
    """Readiness's three hops in a row against `upstream`, as the manager and the doctor run them."""
    return desktop_banner(upstream.netns, upstream.address, upstream.port, timeout, websocket=upstream.websocket)


async def viewer_outcome(upstream: Upstream) -> bytes | tuple[int | None, str | None]:
    """What the proxy makes of `upstream`: the first bytes relayed to a viewer, or the close code and reason."""
    async with controller(ViewerProxy(connect_timeout=5.0), to(upstream)) as ctl, ctl.viewer() as viewer:
        try:
            async with asyncio.timeout(5.0):
                first = await viewer.recv(decode=False)
        except ConnectionClosed:
            return await close_of(viewer)
        assert isinstance(first, bytes)
        return first


def speaks(line: bytes) -> Handler:
    """A VNC server on TCP that sends `line` and holds the connection until the client goes."""
    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(line)
        await reader.read()
        writer.close()
    return vnc


@contextlib.asynccontextmanager
async def desktop(path: str, line: bytes) -> AsyncIterator[Upstream]:
    """A desktop whose VNC server sends `line`: straight on TCP (rfb), or as a WebSocket message."""
    if path == "rfb":
        async with tcp_upstream(speaks(line)) as upstream:
            yield rfb_at(upstream)
        return

    async def websockify(connection: ServerConnection) -> None:
        await connection.send(line)
        await connection.wait_closed()

    async with websocket_upstream(websockify) as upstream:
        yield upstream


@pytest.mark.parametrize("path", ["rfb", "websockify"])
@pytest.mark.parametrize("line", ACCEPTED + REFUSED)
def test_readiness_accepts_a_banner_exactly_when_the_proxy_relays_it(path: str, line: bytes) -> None:
    async def scenario() -> tuple[str | ProbeFailed, bytes | tuple[int | None, str | None]]:
        async with desktop(path, line) as upstream:
            try:
                ready: str | ProbeFailed = await within(probe(upstream))
            except ProbeFailed as failed:
                ready = failed
            return ready, await viewer_outcome(upstream)

    ready, relayed = asyncio.run(scenario())
    if line in ACCEPTED:
        assert ready == line.decode().strip()
        assert relayed == line
    else:
        assert isinstance(ready, ProbeFailed) and ready.hop == "rfb.banner"
        assert relayed == (4502, f"rfb.banner: {ready.reason}")
        assert line.startswith(b"HTTP") or "browservm speaks 3.7 and 3.8" in ready.reason


@pytest.mark.parametrize("line", ACCEPTED + REFUSED)
def test_the_screen_judge_accepts_the_same_versions(line: bytes) -> None:
    """The judge answers an accepted server with the server's own version; it refuses the others
    with readiness's reason."""
    answers: list[bytes] = []

    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(line)
        with contextlib.suppress(asyncio.IncompleteReadError):
            answers.append(await reader.readexactly(12))
        writer.close()

    async def scenario() -> str:
        async with tcp_upstream(vnc) as upstream:
            try:
                await within(probe(rfb_at(upstream)))
                reason = ""
            except ProbeFailed as failed:
                reason = failed.reason
            reader, writer = await asyncio.open_connection(str(upstream.address), upstream.port)
            try:
                with pytest.raises((ScreenError, rfb.HandshakeFailed)) as judged:
                    await wait_browser_on_screen(reader, writer, "password", 5.0)
            finally:
                writer.close()
            if line in ACCEPTED:
                assert judged.type is ScreenError  # it went on to authenticate; the server then left
            else:
                assert str(judged.value) == reason
            return reason

    reason = asyncio.run(scenario())
    assert (answers[-1:] == [line]) == (line in ACCEPTED) == (reason == "")


@dataclass
class Seen:
    """The upgrade request a hand-written server received."""

    headers: dict[str, str] = field(default_factory=dict)


def answers_upgrade(seen: Seen, then: bytes) -> Handler:
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.headers = {name.strip().lower(): value.strip() for name, _, value in
                        (line.partition(":") for line in head.decode().split("\r\n")[1:] if line)}
        writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {accept_key(seen.headers['sec-websocket-key'])}\r\n"
                     "Sec-WebSocket-Protocol: binary\r\n\r\n".encode())
        writer.write(then)
        await reader.read()
        writer.close()
    return server


def test_the_upgrade_is_the_proxys_binary_without_compression() -> None:
    seen = Seen()

    async def scenario() -> str:
        async with tcp_upstream(answers_upgrade(seen, b"\x82\x0cRFB 003.008\n")) as upstream:
            banner: str = await within(probe(upstream))
            return banner

    assert asyncio.run(scenario()) == "RFB 003.008"
    assert seen.headers["sec-websocket-protocol"] == "binary"
    assert "sec-websocket-extensions" not in seen.headers  # permessage-deflate costs ~50x the relay
    assert seen.headers["host"].startswith("127.0.0.1:")


def answers(response: bytes) -> Handler:
    """A server that answers the upgrade request with `response` and hangs up."""
    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()
    return server


@pytest.mark.parametrize(("server", "reason"), [
    (answers(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"), "expected 101 Switching Protocols, got 200 OK"),
    # not followed: a guest does not send the controller to another address
    (answers(b"HTTP/1.1 302 Found\r\nLocation: ws://192.0.2.1:6080/websockify\r\nContent-Length: 0\r\n\r\n"),
     "expected 101 Switching Protocols, got 302 Found"),
])
def test_a_refused_upgrade_is_ws_upgrade_for_readiness_and_the_proxy(server: Handler, reason: str) -> None:
    async def scenario() -> tuple[ProbeFailed, bytes | tuple[int | None, str | None]]:
        async with tcp_upstream(server) as upstream:
            with pytest.raises(ProbeFailed) as failed:
                await within(probe(upstream))
            return failed.value, await viewer_outcome(upstream)

    failed, relayed = asyncio.run(scenario())
    assert (failed.hop, failed.reason) == ("ws.upgrade", reason)
    assert relayed == (4502, f"ws.upgrade: {reason}")


async def closes(connection: ServerConnection) -> None:
    await connection.close(1011, "Failed to connect to downstream server")  # websockify without x11vnc


async def floods(connection: ServerConnection) -> None:
    await connection.send(b"R" * (PROBE.max_message + 1))
    await connection.wait_closed()


@pytest.mark.parametrize(("server", "reason"), [
    # "closed": the doctor's finding is then vnc.unreachable (doctor/vm_walk.py)
    (closes, "websockify closed the WebSocket (1011 'Failed to connect to downstream server') before the VNC "
             "server spoke"),
    (floods, f"the VM sent a message larger than {PROBE.max_message} bytes"),
])
def test_a_websocket_that_ends_or_overflows_before_the_banner_fails_rfb_banner(
        server: Callable[[ServerConnection], Awaitable[None]], reason: str) -> None:
    async def scenario() -> ProbeFailed:
        async with websocket_upstream(server) as upstream:
            with pytest.raises(ProbeFailed) as failed:
                await within(probe(upstream))
            return failed.value

    failed = asyncio.run(scenario())
    assert (failed.hop, failed.reason) == ("rfb.banner", reason)


def test_each_step_runs_within_its_callers_own_deadline_and_close_hangs_up() -> None:
    """The manager gives ws.upgrade and rfb.banner deadlines of their own: a step that runs out is
    the caller's TimeoutError, and the connection is let go when closed."""
    hung_up = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        hung_up.set()

    async def scenario() -> None:
        async with tcp_upstream(silent) as upstream:
            for websocket in (True, False):
                hung_up.clear()
                connection = await DesktopConnection.open(NetworkNamespace(None), LOCALHOST, upstream.port, 5.0,
                                                          websocket=websocket)
                try:
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.3):
                            await (connection.upgrade() if websocket else connection.banner())
                finally:
                    connection.close()
                await within(hung_up.wait())

    asyncio.run(scenario())
