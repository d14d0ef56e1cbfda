"""ViewerProxy against real programs on loopback: uvicorn serving a Starlette route that calls
`serve`, Debian's websockify in front of small asyncio TCP servers (the "VNC server"), and
WebSocket servers that misbehave on purpose where websockify would not. The viewers are the
`websockets` client, as noVNC would be: binary frames, no compression.

No root: NetworkNamespace(None) is the test's own namespace. Every wait is for a condition, with a
deadline; the only sleeps are the slow viewer's pauses, which are what makes it slow.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from browservm import rfb
from browservm.api.proxy import (
    MAX_REASON_BYTES,
    UVICORN_WEBSOCKETS,
    VIEWER_MAX_MESSAGE,
    Direction,
    Ended,
    Refused,
    Upstream,
    ViewerProxy,
    close_reason,
)
from browservm.hostnet.netns import NetworkNamespace

WEBSOCKIFY = "/usr/bin/websockify"
BANNER = b"RFB 003.008\n"
DEADLINE = 15.0  # for any one condition; a passing run meets each in well under a second
LOCALHOST = IPv4Address("127.0.0.1")
MiB = 2**20
BINARY = Subprotocol("binary")

needs_websockify = pytest.mark.skipif(not Path(WEBSOCKIFY).exists(), reason=f"{WEBSOCKIFY} is not installed")


# --- the controller, as the service runs it ---------------------------------------------------------


@dataclass
class Recorder:
    """ProxyEvents that remember."""

    opened_count: int = 0
    closed_codes: list[int] = field(default_factory=list)
    relayed: dict[str, int] = field(default_factory=lambda: {"to_vm": 0, "to_viewer": 0})

    def opened(self) -> None:
        self.opened_count += 1

    def closed(self, code: int) -> None:
        self.closed_codes.append(code)

    def bytes(self, direction: Direction, n: int) -> None:
        self.relayed[direction] += n


def to(upstream: Upstream) -> Callable[[], Awaitable[Upstream]]:
    async def resolve() -> Upstream:
        return upstream
    return resolve


def local(port: int) -> Upstream:
    return Upstream(NetworkNamespace(None), LOCALHOST, port, websocket=True)


@dataclass
class Controller:
    url: str
    served: asyncio.Queue[int]  # the code each serve() returned, in order

    def viewer(self, *, subprotocols: list[str] | None = None, max_queue: int = 16) -> connect:
        offered = [Subprotocol(name) for name in (["binary"] if subprotocols is None else subprotocols)]
        return connect(self.url, compression=None, proxy=None, subprotocols=offered or None, max_size=None,
                       max_queue=max_queue, ping_interval=None, open_timeout=DEADLINE)

    async def next_served(self) -> int:
        return await asyncio.wait_for(self.served.get(), DEADLINE)


@contextlib.asynccontextmanager
async def controller(proxy: ViewerProxy, resolve: Callable[[], Awaitable[Upstream]],
                     ended: asyncio.Event | None = None) -> AsyncIterator[Controller]:
    """uvicorn on 127.0.0.1 with one route, `/v1/vms/{id}/vnc`, that hands its WebSocket to `proxy`."""
    served: asyncio.Queue[int] = asyncio.Queue()
    vm_ended = ended if ended is not None else asyncio.Event()

    async def vnc(websocket: WebSocket) -> None:
        served.put_nowait(await proxy.serve(websocket, resolve, vm_ended))

    app = Starlette(routes=[WebSocketRoute("/v1/vms/{vm_id}/vnc", vnc)])
    listener = socket.create_server(("127.0.0.1", 0))
    # The WebSocket settings `serve` gives uvicorn: the viewer's message limit is part of what is tested.
    server = uvicorn.Server(uvicorn.Config(app, **UVICORN_WEBSOCKETS, lifespan="off", log_config=None,
                                           log_level="warning", timeout_graceful_shutdown=2))
    # Connections wait in the listener's backlog until uvicorn runs: no need to wait for it to start.
    running = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        yield Controller(f"ws://127.0.0.1:{listener.getsockname()[1]}/v1/vms/vm-1/vnc?token=t", served)
    finally:
        server.should_exit = True
        await running
        listener.close()


async def close_of(viewer: ClientConnection) -> tuple[int | None, str | None]:
    """Read until the controller closes the viewer; its code and reason."""
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(DEADLINE):
            while True:
                await viewer.recv()
    return viewer.close_code, viewer.close_reason


async def within(awaitable: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(awaitable, DEADLINE)


# --- the VM's side: websockify and what stands behind it ---------------------------------------------


@dataclass
class Websockify:
    """Debian's websockify on 127.0.0.1:`port`, relaying to whatever serves `target` (a listening socket)."""

    port: int
    target: socket.socket

    @property
    def upstream(self) -> Upstream:
        return local(self.port)

    @contextlib.asynccontextmanager
    async def serving(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                              Awaitable[None]]) -> AsyncIterator[None]:
        """`handler` answers websockify's connections to the target: it is the VNC server."""
        async with await asyncio.start_server(handler, sock=self.target):
            yield


@pytest.fixture
def websockify(tmp_path: Path) -> Iterator[Websockify]:
    """websockify in inetd mode on a listening socket made here: it is listening before it starts,
    so nothing waits for it to come up. Killed with its per-connection children at the end."""
    if not Path(WEBSOCKIFY).exists():
        pytest.skip(f"{WEBSOCKIFY} is not installed")
    target = socket.create_server(("127.0.0.1", 0))
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    with (tmp_path / "websockify.log").open("wb") as log:
        process = subprocess.Popen([WEBSOCKIFY, "--inetd", f"127.0.0.1:{target.getsockname()[1]}"],
                                   stdin=listener.fileno(), stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    port = listener.getsockname()[1]
    listener.close()
    try:
        yield Websockify(port, target)
    finally:
        # Its own session: the group is websockify and the processes it forked for connections.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
        target.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A VNC-like server: the banner first, then every byte back, until the viewer goes."""
    writer.write(BANNER)
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def websocket_upstream(handler: Callable[[ServerConnection], Awaitable[None]]) -> AsyncIterator[Upstream]:
    """A WebSocket server standing in for a misbehaving guest."""
    async with ws_serve(handler, "127.0.0.1", 0, compression=None, ping_interval=None,
                        select_subprotocol=lambda _, offered: BINARY if BINARY in offered else None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield local(port)


@contextlib.asynccontextmanager
async def tcp_upstream(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> AsyncIterator[Upstream]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield local(server.sockets[0].getsockname()[1])


def accept_key(key: str) -> str:
    digest = hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


async def upgrade_by_hand(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a WebSocket upgrade without a WebSocket library, so what comes after it is ours to decide."""
    lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    key = headers["sec-websocket-key"]
    writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Accept: {accept_key(key)}\r\nSec-WebSocket-Protocol: binary\r\n\r\n".encode())


# --- tests -------------------------------------------------------------------------------------------


def test_close_reason_fits_a_close_frame_and_cuts_between_characters() -> None:
    assert close_reason("short") == "short"
    long = "é" * 100  # 200 bytes
    cut = close_reason(long)
    assert len(cut.encode()) <= MAX_REASON_BYTES
    assert cut.endswith("…") and set(cut[:-1]) == {"é"}
    assert close_reason("x" * 123) == "x" * 123


def test_a_refusal_is_an_application_close_code() -> None:
    with pytest.raises(ValueError, match="3000-4999"):
        Refused(1000, "not a refusal")


@pytest.mark.parametrize(("code", "reason"), [(4401, "the viewer token has expired"),
                                              (4404, "no VM vm-1"),
                                              (4409, "the VM is not ready: net.arp")])
def test_refusals_close_the_accepted_websocket_with_their_code(code: int, reason: str) -> None:
    async def scenario() -> None:
        events = Recorder()

        async def resolve() -> Upstream:
            raise Refused(code, reason)

        async with controller(ViewerProxy(events), resolve) as ctl, ctl.viewer() as viewer:
            # accepted first, with the subprotocol the browser offered: the page can read the close
            assert viewer.subprotocol == "binary"
            assert await close_of(viewer) == (code, reason)
            assert await ctl.next_served() == code
        assert events.opened_count == 1 and events.closed_codes == [code]

    asyncio.run(scenario())


def test_a_failing_resolve_closes_1011_without_its_details() -> None:
    async def scenario() -> None:
        async def resolve() -> Upstream:
            raise KeyError("the secret internals")

        async with controller(ViewerProxy(), resolve) as ctl, ctl.viewer(subprotocols=[]) as viewer:
            assert viewer.subprotocol is None
            assert await close_of(viewer) == (1011, "the controller failed; its log says why")

    asyncio.run(scenario())


def vm_on(path: str, request: pytest.FixtureRequest) -> Callable[
        [Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]],
        contextlib.AbstractAsyncContextManager[Upstream]]:
    """A VM side for `path` whose VNC server is the handler given: behind Debian's websockify, or
    reached straight on TCP (the rfb path)."""
    @contextlib.asynccontextmanager
    async def vm(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
                 ) -> AsyncIterator[Upstream]:
        if path == "rfb":
            async with tcp_upstream(handler) as upstream:
                yield rfb_at(upstream)
            return
        if not Path(WEBSOCKIFY).exists():
            pytest.skip(f"{WEBSOCKIFY} is not installed")
        websockify: Websockify = request.getfixturevalue("websockify")
        async with websockify.serving(handler):
            yield websockify.upstream

    return vm


@pytest.mark.parametrize("path", ["websockify", "rfb"])
def test_bytes_both_ways_intact(path: str, request: pytest.FixtureRequest) -> None:
    """Several MiB each way at once, in random chunk sizes, compared by SHA-256 at the far ends; on
    both desktop paths (through websockify, and RFB straight on TCP)."""
    size = 6 * MiB
    rng = random.Random(8)
    to_vm, to_viewer = rng.randbytes(size), rng.randbytes(size)
    vm = vm_on(path, request)

    async def scenario() -> None:
        events = Recorder()
        vm_received: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            async def send() -> None:
                writer.write(BANNER)
                offset = 0
                while offset < size:
                    step = rng.randint(1, 256 * 1024)
                    writer.write(to_viewer[offset:offset + step])
                    await writer.drain()
                    offset += step

            async def receive() -> None:
                digest, got = hashlib.sha256(), 0
                while got < size and (data := await reader.read(65536)):
                    digest.update(data)
                    got += len(data)
                vm_received.set_result(digest.digest())

            await asyncio.gather(send(), receive())
            await reader.read()  # hold the connection until the viewer goes: websockify drops data on close

        async with vm(vnc) as upstream, controller(ViewerProxy(events), to(upstream)) as ctl:
            async with ctl.viewer() as viewer:
                async def send() -> None:
                    offset = 0
                    while offset < size:
                        step = rng.randint(1, VIEWER_MAX_MESSAGE)  # a viewer's messages are bounded
                        await viewer.send(to_vm[offset:offset + step])
                        offset += step

                async def receive() -> bytes:
                    # a byte stream: the banner and the data come in whatever messages the VM's side makes
                    digest, got = hashlib.sha256(), 0
                    while got < len(BANNER) + size:
                        message = await viewer.recv(decode=False)
                        # the rfb path reads the guest 64 KiB at a time: no message to the viewer is larger
                        assert path != "rfb" or len(message) <= 64 * 1024
                        digest.update(message)
                        got += len(message)
                    assert got == len(BANNER) + size
                    return digest.digest()

                _, viewer_received = await within(asyncio.gather(send(), receive()))
                assert viewer_received == hashlib.sha256(BANNER + to_viewer).digest()
                assert await within(vm_received) == hashlib.sha256(to_vm).digest()
            assert await ctl.next_served() == 1000  # the viewer's own close
        assert events.relayed == {"to_vm": size, "to_viewer": size + len(BANNER)}

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["websockify", "rfb"])
def test_a_slow_viewer_keeps_the_controller_memory_bounded(path: str, request: pytest.FixtureRequest) -> None:
    """The VM floods 64 MiB as fast as it can; the viewer reads at about 25 MiB/s, several times
    slower than the relay can go. Everything in this process but the VM's fixed 1 MiB block is the
    controller and the viewer, and it grows by a few MiB: the backlog waits in the VM's sockets.
    On both desktop paths: through websockify, and RFB straight on TCP."""
    block = random.Random(9).randbytes(MiB)
    blocks = 64
    read_pause = 0.04  # after each MiB read: the viewer is slow by design, this is not a wait for a condition

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        for _ in range(blocks):
            writer.write(block)
            await writer.drain()
        await reader.read()

    async def scenario() -> tuple[int, int]:
        events = Recorder()
        async with (vm_on(path, request)(flood) as upstream, controller(ViewerProxy(events), to(upstream)) as ctl,
                    ctl.viewer(max_queue=2) as viewer):
            first = await within(viewer.recv(decode=False))
            assert first.startswith(BANNER)
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            digest, got = hashlib.sha256(first[len(BANNER):]), len(first) - len(BANNER)
            most_ahead = 0
            next_pause = MiB
            while got < blocks * MiB:
                message = await within(viewer.recv(decode=False))
                digest.update(message)
                got += len(message)
                most_ahead = max(most_ahead, events.relayed["to_viewer"] - len(BANNER) - got)
                if got >= next_pause:
                    next_pause += MiB
                    await asyncio.sleep(read_pause)
            _, peak = tracemalloc.get_traced_memory()
        expected = hashlib.sha256()
        for _ in range(blocks):
            expected.update(block)
        assert digest.digest() == expected.digest()
        return peak - baseline, most_ahead

    tracemalloc.start()
    try:
        growth, most_ahead = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    print(f"peak growth of traced memory: {growth / MiB:.2f} MiB; the controller was at most "
          f"{most_ahead / MiB:.2f} MiB ahead of the viewer")
    assert growth < 6 * MiB


@pytest.mark.parametrize("path", ["websockify", "rfb"])
def test_a_viewer_flooding_a_vm_that_reads_nothing_keeps_the_controller_memory_bounded(
        path: str, request: pytest.FixtureRequest) -> None:
    """The other direction (issue 18: with 16 MiB messages a viewer made the controller hold ~60 MiB
    per connection while the guest stopped reading): the viewer sends the largest messages it may, as
    fast as the controller takes them, and the VM reads nothing after its banner. On the rfb path the
    relay stalls once every buffer on the way is full; websockify (in the guest, another process here)
    takes all it is sent. Either way the controller grows by under 2 MiB."""
    block = random.Random(10).randbytes(VIEWER_MAX_MESSAGE)

    async def scenario() -> int:
        finished = asyncio.Event()

        async def reads_nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(BANNER)
            await finished.wait()
            writer.close()

        events = Recorder()
        async with (vm_on(path, request)(reads_nothing) as upstream,
                    controller(ViewerProxy(events), to(upstream)) as ctl, ctl.viewer() as viewer):
            assert (await within(viewer.recv(decode=False))).startswith(BANNER)
            baseline, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while sent < 64 * MiB:
                    await viewer.send(block)
                    sent += len(block)

            flooding = asyncio.create_task(flood())
            # Stalled: nothing more went for half a second (a window, not a condition one could await:
            # what is awaited is that nothing happens). Loopback socket buffers hold a few MiB at most.
            deadline = asyncio.get_running_loop().time() + DEADLINE
            last = -1
            while sent != last and not flooding.done():
                assert asyncio.get_running_loop().time() < deadline, "the relay neither stalled nor finished"
                last = sent
                await asyncio.sleep(0.5)
            _, peak = tracemalloc.get_traced_memory()
            assert path != "rfb" or not flooding.done(), "64 MiB went into a VM that reads nothing"
            print(f"{path}: the viewer sent {sent / MiB:.1f} MiB, {events.relayed['to_vm'] / MiB:.1f} MiB "
                  f"relayed to the VM; peak growth of traced memory {(peak - baseline) / MiB:.2f} MiB")
            flooding.cancel()
            finished.set()
        return peak - baseline

    tracemalloc.start()
    try:
        growth = asyncio.run(scenario())
    finally:
        tracemalloc.stop()
    assert growth < 2 * MiB


def test_a_viewer_message_over_the_limit_closes_1009_before_it_is_read_whole() -> None:
    async def scenario() -> None:
        async with tcp_upstream(echo) as upstream, controller(ViewerProxy(), to(rfb_at(upstream))) as ctl, \
                ctl.viewer() as viewer:
            assert await within(viewer.recv(decode=False)) == BANNER
            await viewer.send(bytes(VIEWER_MAX_MESSAGE))  # the largest allowed: relayed
            assert len(await within(viewer.recv(decode=False))) > 0
            with contextlib.suppress(ConnectionClosed):
                await viewer.send(bytes(16 * MiB))
            assert (await close_of(viewer))[0] == 1009
            assert await ctl.next_served() == 1009

    asyncio.run(scenario())


def test_net_tcp_nothing_listening_closes_4502() -> None:
    async def scenario() -> None:
        # bound but not listening: connections to it are refused, and no one else can take the port
        with socket.socket() as bound:
            bound.bind(("127.0.0.1", 0))
            port = bound.getsockname()[1]
            async with controller(ViewerProxy(), to(local(port))) as ctl, ctl.viewer() as viewer:
                assert await close_of(viewer) == (4502, f"net.tcp: 127.0.0.1:{port}: Connection refused")

    asyncio.run(scenario())


def test_net_tcp_no_answer_times_out_with_4502() -> None:
    async def scenario() -> None:
        # A listener whose one-place backlog is taken drops further SYNs: connecting hangs, as to a VM
        # that does not answer.
        with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.socket() as filler:
            filler.connect(full.getsockname())
            port = full.getsockname()[1]
            async with controller(ViewerProxy(connect_timeout=0.5), to(local(port))) as ctl, ctl.viewer() as viewer:
                assert await close_of(viewer) == (4502, f"net.tcp: no answer from 127.0.0.1:{port} within 0.5 s")

    asyncio.run(scenario())


def test_ws_upgrade_answered_with_200_closes_4502() -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nhi")
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with (tcp_upstream(http) as upstream, controller(ViewerProxy(), to(upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await close_of(viewer) == (4502, "ws.upgrade: expected 101 Switching Protocols, got 200 OK")

    asyncio.run(scenario())


def test_ws_upgrade_never_answered_times_out_with_4502() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def scenario() -> None:
        async with tcp_upstream(silent) as upstream, \
                controller(ViewerProxy(connect_timeout=0.5), to(upstream)) as ctl, ctl.viewer() as viewer:
            assert await close_of(viewer) == (4502, "ws.upgrade: no answer to the upgrade within 0.5 s")

    asyncio.run(scenario())


def test_rfb_banner_upstream_closes_at_once_closes_4502() -> None:
    async def closes(connection: ServerConnection) -> None:
        await connection.close()

    async def scenario() -> None:
        async with (websocket_upstream(closes) as upstream, controller(ViewerProxy(), to(upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await close_of(viewer) == (
                4502, "rfb.banner: websockify closed the WebSocket (1000 '') before the VNC server spoke")

    asyncio.run(scenario())


@needs_websockify
def test_rfb_banner_vnc_server_not_running_closes_4502(websockify: Websockify) -> None:
    websockify.target.close()  # websockify runs, the VNC server behind it does not

    async def scenario() -> None:
        async with controller(ViewerProxy(), to(websockify.upstream)) as ctl, ctl.viewer() as viewer:
            code, reason = await close_of(viewer)
            assert (code, reason) == (4502, "rfb.banner: websockify closed the WebSocket (1011 'Failed to "
                                            "connect to downstream server') before the VNC server spoke")

    asyncio.run(scenario())


def test_rfb_banner_silent_after_the_upgrade_times_out_with_4502() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upgrade_by_hand(reader, writer)
        await reader.read()

    async def scenario() -> None:
        async with (tcp_upstream(silent) as upstream,
                    controller(ViewerProxy(connect_timeout=1.0, close_timeout=0.5), to(upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await close_of(viewer) == (4502, "rfb.banner: nothing came through the WebSocket within 1 s: "
                                                    "the VNC server behind websockify is silent")

    asyncio.run(scenario())


@needs_websockify
@pytest.mark.parametrize("ended", [Ended(), asyncio.Event()], ids=["Ended", "Event"])
def test_ended_mid_session_closes_4410_and_the_upstream(websockify: Websockify, ended: asyncio.Event) -> None:
    vm_side_closed = asyncio.Event()

    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await echo(reader, writer)
        vm_side_closed.set()

    async def scenario() -> None:
        async with (websockify.serving(vnc), controller(ViewerProxy(), to(websockify.upstream), ended) as ctl,
                    ctl.viewer() as viewer):
            assert await within(viewer.recv()) == BANNER
            await viewer.send(b"ping")
            assert await within(viewer.recv()) == b"ping"
            if isinstance(ended, Ended):
                ended.end("the VM failed: vmm.exited")
                expected = "the VM failed: vmm.exited"
            else:
                ended.set()
                expected = "the VM was deleted"
            assert await close_of(viewer) == (4410, expected)
            assert await ctl.next_served() == 4410
            await within(vm_side_closed.wait())

    asyncio.run(scenario())


@needs_websockify
def test_upstream_closing_normally_closes_1000(websockify: Websockify) -> None:
    async def quits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await reader.readexactly(3)
        writer.close()

    async def scenario() -> None:
        async with (websockify.serving(quits), controller(ViewerProxy(), to(websockify.upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await within(viewer.recv()) == BANNER
            await viewer.send(b"bye")
            assert await close_of(viewer) == (1000, "the VM's desktop closed the connection: Target closed")

    asyncio.run(scenario())


def test_upstream_breaking_mid_stream_closes_1011() -> None:
    async def breaks(connection: ServerConnection) -> None:
        await connection.send(BANNER)
        await connection.recv()
        connection.transport.abort()

    async def scenario() -> None:
        async with (websocket_upstream(breaks) as upstream, controller(ViewerProxy(), to(upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await within(viewer.recv()) == BANNER
            await viewer.send(b"x")
            assert await close_of(viewer) == (1011, "the connection to the VM broke without a close frame")

    asyncio.run(scenario())


def test_a_message_over_max_message_from_the_vm_closes_1011() -> None:
    async def oversized(connection: ServerConnection) -> None:
        await connection.send(BANNER)
        await connection.send(b"\0" * (64 * 1024 + 1))
        await connection.wait_closed()

    async def scenario() -> None:
        async with websocket_upstream(oversized) as upstream, \
                controller(ViewerProxy(max_message=64 * 1024), to(upstream)) as ctl, ctl.viewer() as viewer:
            assert await within(viewer.recv()) == BANNER
            assert await close_of(viewer) == (1011, "the VM sent a message larger than 65536 bytes")

    asyncio.run(scenario())


def test_a_vm_that_stops_answering_pings_closes_1011() -> None:
    """Upgrade, banner, then silence: no pong ever. The upstream leg's keepalive ends the relay."""
    async def frozen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await upgrade_by_hand(reader, writer)
        writer.write(bytes([0x82, len(BANNER)]) + BANNER)
        await reader.read()

    async def scenario() -> None:
        async with tcp_upstream(frozen) as upstream, \
                controller(ViewerProxy(ping_interval=0.2, close_timeout=0.5), to(upstream)) as ctl, \
                ctl.viewer() as viewer:
            assert await within(viewer.recv()) == BANNER
            assert await close_of(viewer) == (1011, "the connection to the VM failed: keepalive ping timeout")

    asyncio.run(scenario())


@needs_websockify
def test_a_text_frame_from_the_viewer_closes_1003(websockify: Websockify) -> None:
    async def scenario() -> None:
        async with (websockify.serving(echo), controller(ViewerProxy(), to(websockify.upstream)) as ctl,
                    ctl.viewer() as viewer):
            assert await within(viewer.recv()) == BANNER
            await viewer.send("text")
            assert await close_of(viewer) == (1003, "text frames are not relayed: the desktop speaks binary (RFB)")

    asyncio.run(scenario())


@needs_websockify
def test_two_viewers_on_one_vm_are_independent_and_one_can_reconnect(websockify: Websockify) -> None:
    connections_closed = 0
    closed_at_vm = asyncio.Condition()

    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections_closed
        await echo(reader, writer)
        async with closed_at_vm:
            connections_closed += 1
            closed_at_vm.notify_all()

    async def round_trip(viewer: ClientConnection, data: bytes) -> None:
        await viewer.send(data)
        assert await within(viewer.recv()) == data

    async def scenario() -> None:
        events = Recorder()
        proxy = ViewerProxy(events)
        async with (websockify.serving(vnc), controller(proxy, to(websockify.upstream)) as ctl,
                    ctl.viewer() as second):
            async with ctl.viewer() as first:
                assert await within(first.recv()) == BANNER
                assert await within(second.recv()) == BANNER
                await asyncio.gather(round_trip(first, b"one" * 1000), round_trip(second, b"two" * 1000))
                assert proxy.viewers == 2
            assert await ctl.next_served() == 1000
            async with closed_at_vm:  # the first viewer's leaving closed its own upstream only
                await within(closed_at_vm.wait_for(lambda: connections_closed == 1))
            await round_trip(second, b"still here")
            async with ctl.viewer() as again:  # the first viewer reconnects
                assert await within(again.recv()) == BANNER
                await round_trip(again, b"back")
                await round_trip(second, b"both")
        assert events.opened_count == 3 and events.closed_codes == [1000, 1000, 1000]

    asyncio.run(scenario())


@needs_websockify
def test_shutdown_closes_every_viewer_with_1001_and_waits(websockify: Websockify) -> None:
    async def scenario() -> None:
        proxy = ViewerProxy()
        async with websockify.serving(echo), controller(proxy, to(websockify.upstream)) as ctl:
            async with ctl.viewer() as first, ctl.viewer() as second:
                assert await within(first.recv()) == BANNER
                assert await within(second.recv()) == BANNER
                await within(proxy.shutdown())
                assert proxy.viewers == 0
                assert await close_of(first) == (1001, "the controller is shutting down")
                assert await close_of(second) == (1001, "the controller is shutting down")
                assert [await ctl.next_served(), await ctl.next_served()] == [1001, 1001]
            async with ctl.viewer() as late:  # after shutdown began: accepted, then closed the same way
                assert await close_of(late) == (1001, "the controller is shutting down")

    asyncio.run(scenario())


# --- the rfb path: RFB straight on TCP to the VM's x11vnc ---------------------------------------------


def rfb_at(upstream: Upstream, password: str | None = None) -> Upstream:
    """The same server, reached the rfb way: no WebSocket, RFB from the first byte."""
    return Upstream(upstream.netns, upstream.address, upstream.port, websocket=False, vnc_password=password)


class VncServer:
    """A VNC server that asks for `password` (RFC 6143 7.2.2), then sends ServerInit-like bytes and
    echoes; it keeps every byte the proxy sent it."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.challenge = os.urandom(16)
        self.after_auth = b"SERVER-INIT"
        self.authenticated = 0  # connections past authentication
        self.ended = 0  # connections that ended
        self.close_next = False  # end the next connection right after authentication
        self._changed = asyncio.Condition()

    async def reach(self, condition: Callable[[], bool]) -> None:
        """Until `condition` holds (it reads the counters)."""
        async with self._changed:
            await self._changed.wait_for(condition)

    async def _count(self, counter: str) -> None:
        async with self._changed:
            setattr(self, counter, getattr(self, counter) + 1)
            self._changed.notify_all()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        finally:
            await self._count("ended")

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        assert await reader.readexactly(12) == BANNER
        writer.write(bytes([1, 2]) + self.challenge)  # one security type: VNC authentication
        assert await reader.readexactly(1) == bytes([2])
        if await reader.readexactly(16) != rfb.vnc_response(self.password, self.challenge):
            reason = b"password check failed"
            writer.write(struct.pack(">II", 1, len(reason)) + reason)
            writer.close()
            return
        writer.write(struct.pack(">I", 0))
        await writer.drain()
        await self._count("authenticated")
        if self.close_next:
            self.close_next = False
            writer.close()
            await writer.wait_closed()
            return
        await reader.readexactly(1)  # ClientInit: as x11vnc, nothing more is said before it
        writer.write(self.after_auth)
        await echo_after(reader, writer)


async def echo_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def no_auth_handshake(viewer: ClientConnection) -> bytes:
    """The viewer's side of the handshake the proxy offers (RFB 3.8, no authentication); the bytes
    the viewer received during it."""
    received: bytes = await within(viewer.recv(decode=False))
    assert received == BANNER
    await viewer.send(BANNER)
    types: bytes = await within(viewer.recv(decode=False))
    assert types == bytes([1, 1])
    await viewer.send(bytes([1]))
    result: bytes = await within(viewer.recv(decode=False))
    assert result == struct.pack(">I", 0)
    return received + types + result


def test_rfb_path_the_proxy_authenticates_and_the_password_stays_on_the_host() -> None:
    server = VncServer("s3cret-pw")

    async def scenario() -> None:
        async with tcp_upstream(server) as upstream, \
                controller(ViewerProxy(), to(rfb_at(upstream, "s3cret-pw"))) as ctl, ctl.viewer() as viewer:
            seen = await no_auth_handshake(viewer)
            await viewer.send(b"\x01")  # ClientInit
            seen += await within(viewer.recv())
            assert seen.endswith(server.after_auth)
            await viewer.send(KEY_EVENT)
            assert await within(viewer.recv()) == KEY_EVENT
            response = rfb.vnc_response("s3cret-pw", server.challenge)
            assert b"s3cret-pw" not in seen and response not in seen and server.challenge not in seen

    asyncio.run(scenario())


KEY_EVENT = struct.pack(">BBxxI", 4, 1, 0xFF0D)  # Return pressed: a client message the proxy relays

# What noVNC sends in a session, one of each message it has (rfb.js RFB.messages).
NOVNC_SESSION = b"".join([
    b"\x01",  # ClientInit
    struct.pack(">BxxxBBBBHHHBBBxxx", 0, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0),  # SetPixelFormat
    struct.pack(">BxH", 2, 3) + struct.pack(">iii", 0, -223, -308),  # SetEncodings
    struct.pack(">BBHHHH", 3, 0, 0, 0, 1280, 800),  # FramebufferUpdateRequest
    KEY_EVENT,
    struct.pack(">BBHH", 5, 1, 10, 20),  # PointerEvent
    struct.pack(">BxxxI", 6, 5) + b"hello",  # ClientCutText
    struct.pack(">BxxxI", 6, 2**32 - 4) + b"\x00\x00\x00\x01",  # an extended clipboard message (length -4)
    struct.pack(">BBHHHH", 150, 1, 0, 0, 1280, 800),  # EnableContinuousUpdates
    struct.pack(">BxxxIB", 248, 0x80000000, 3) + b"abc",  # ClientFence
    struct.pack(">BxBB", 250, 1, 2),  # xvp
    struct.pack(">BxHHBx", 251, 1024, 768, 1) + struct.pack(">IHHHHI", 0, 0, 0, 1024, 768, 0),  # SetDesktopSize
    struct.pack(">BBHII", 255, 0, 1, 0xFF0D, 28),  # QEMU extended key event
])


CLIPBOARDS = (struct.pack(">BxxxI", 6, 5) + b"hello", struct.pack(">BxxxI", 6, 2**32 - 4) + b"\x00\x00\x00\x01")


def relayed(messages: rfb.ClientMessages, stream: bytes, size: int) -> bytes:
    return b"".join(messages.feed(stream[at:at + size]) for at in range(0, len(stream), size))


def test_the_viewers_messages_are_followed_and_relayed_however_they_are_split() -> None:
    for size in (1, 2, 3, 7, 64, len(NOVNC_SESSION)):
        # A SetDesktopSize within the bounds passes as it was.
        assert relayed(rfb.ClientMessages(), NOVNC_SESSION, size) == NOVNC_SESSION
    # A clipboard of the most allowed, in noVNC's 10 KiB pieces, then a message after it.
    messages = rfb.ClientMessages()
    messages.feed(b"\x01" + struct.pack(">BxxxI", 6, rfb.MAX_CUT_TEXT))
    for _ in range(rfb.MAX_CUT_TEXT // 10240):
        assert len(messages.feed(bytes(10240))) == 10240
    assert messages.feed(bytes(rfb.MAX_CUT_TEXT % 10240) + KEY_EVENT).endswith(KEY_EVENT)


def test_a_vm_without_paste_gets_no_clipboard_however_the_stream_is_split() -> None:
    without_clipboards = NOVNC_SESSION
    for clip in CLIPBOARDS:
        without_clipboards = without_clipboards.replace(clip, b"")
    for size in (1, 2, 3, 7, 64, len(NOVNC_SESSION)):
        messages = rfb.ClientMessages(paste=False)
        assert relayed(messages, NOVNC_SESSION, size) == without_clipboards
        assert messages.left_out == 2
    # A clipboard of the most allowed, left out whole, and what follows it relayed.
    messages = rfb.ClientMessages(paste=False)
    left = messages.feed(b"\x01" + struct.pack(">BxxxI", 6, rfb.MAX_CUT_TEXT) + bytes(rfb.MAX_CUT_TEXT) + KEY_EVENT)
    assert left == b"\x01" + KEY_EVENT


def test_rfb_path_a_vm_without_paste_never_receives_the_viewers_clipboard() -> None:
    server = VncServer("pw-paste")

    async def scenario() -> None:
        upstream_of = functools.partial(Upstream, websocket=False, vnc_password="pw-paste", paste=False)
        async with tcp_upstream(server) as upstream, \
                controller(ViewerProxy(), to(upstream_of(upstream.netns, upstream.address, upstream.port))) as ctl, \
                ctl.viewer() as viewer:
            await no_auth_handshake(viewer)
            await viewer.send(b"\x01")
            assert await within(viewer.recv()) == server.after_auth
            await viewer.send(NOVNC_SESSION[1:])
            expected = NOVNC_SESSION[1:].replace(CLIPBOARDS[0], b"").replace(CLIPBOARDS[1], b"")
            assert await within(read_exactly(viewer, len(expected))) == expected  # what the VM got, echoed

    asyncio.run(scenario())


def set_desktop_size(width: int, height: int, *screens: tuple[int, int, int, int]) -> bytes:
    return struct.pack(">BxHHBx", 251, width, height, len(screens)) + b"".join(
        struct.pack(">IHHHHI", number, *screen, 0) for number, screen in enumerate(screens))


@pytest.mark.parametrize(("asked", "given"), [
    (set_desktop_size(4000, 4000, (0, 0, 4000, 4000)), set_desktop_size(2560, 1600, (0, 0, 2560, 1600))),
    (set_desktop_size(320, 200, (0, 0, 320, 200)), set_desktop_size(800, 600, (0, 0, 800, 600))),
    (set_desktop_size(3000, 900, (0, 0, 1500, 900), (1500, 0, 1500, 900)),
     set_desktop_size(2560, 900, (0, 0, 1500, 900), (1500, 0, 1060, 900))),  # the second screen cut at the edge
])
def test_a_desktop_size_out_of_bounds_reaches_the_guest_bounded_however_it_is_split(asked: bytes, given: bytes) -> None:
    stream = b"\x01" + KEY_EVENT + asked + KEY_EVENT
    for size in (1, 5, 9, len(stream)):
        messages = rfb.ClientMessages()
        relayed = b"".join(messages.feed(stream[at:at + size]) for at in range(0, len(stream), size))
        assert relayed == b"\x01" + KEY_EVENT + given + KEY_EVENT


@pytest.mark.parametrize(("sent", "words", "too_big"), [
    (b"\x01" + struct.pack(">BxxxI", 6, rfb.MAX_CUT_TEXT + 1), "clipboard is 1048577 bytes", True),
    (b"\x01" + struct.pack(">Bxxxi", 6, -rfb.MAX_CUT_TEXT - 1), "clipboard is 1048577 bytes", True),
    (b"\x01" + struct.pack(">BxH", 2, 1025), "1025 encodings", False),
    (b"\x01" + b"k", "message type 107", False),
    (b"\x01" + struct.pack(">BB", 255, 1), "QEMU client message subtype 1", False),
    (b"\x01" + KEY_EVENT + b"\x07", "message type 7", False),
])
def test_a_viewer_message_no_viewer_sends_or_a_clipboard_over_the_bound_is_refused(
        sent: bytes, words: str, too_big: bool) -> None:
    with pytest.raises(rfb.ViewerBroke) as broke:
        rfb.ClientMessages().feed(sent)
    assert words in str(broke.value) and broke.value.too_big is too_big


def test_rfb_path_a_clipboard_over_the_bound_closes_1009_and_an_unknown_message_1002() -> None:
    server = VncServer("pw-cut")

    async def scenario() -> None:
        async with tcp_upstream(server) as upstream, \
                controller(ViewerProxy(), to(rfb_at(upstream, "pw-cut"))) as ctl:
            async with ctl.viewer() as viewer:
                await no_auth_handshake(viewer)
                await viewer.send(b"\x01")
                assert await within(viewer.recv()) == server.after_auth
                await viewer.send(NOVNC_SESSION[1:])  # everything a viewer sends passes
                assert await within(read_exactly(viewer, len(NOVNC_SESSION) - 1)) == NOVNC_SESSION[1:]
                await viewer.send(struct.pack(">BxxxI", 6, 64 * MiB))
                assert await close_of(viewer) == (1009, f"the viewer's clipboard is {64 * MiB} bytes (at most "
                                                        f"{rfb.MAX_CUT_TEXT})")
            async with ctl.viewer() as viewer:
                await no_auth_handshake(viewer)
                await viewer.send(b"\x01" + b"GET / HTTP/1.1\r\n")
                code, reason = await close_of(viewer)
                assert code == 1002 and reason is not None and "message type 71" in reason

    asyncio.run(scenario())


async def read_exactly(viewer: ClientConnection, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += await viewer.recv(decode=False)
    return data


def rfb_key(upstream: Upstream, password: str, key: str) -> Upstream:
    return Upstream(upstream.netns, upstream.address, upstream.port, websocket=False, vnc_password=password, key=key)


def test_a_prepared_connection_goes_to_the_next_viewer_of_its_vm_only() -> None:
    """A claimed VM's desktop is connected and authenticated before its viewer comes (prepare): the
    viewer takes that connection; the next viewer connects itself."""
    server = VncServer("pw-ready1")

    async def session(viewer: ClientConnection) -> None:
        await no_auth_handshake(viewer)
        await viewer.send(b"\x01")
        assert await within(viewer.recv()) == server.after_auth
        await viewer.send(KEY_EVENT)
        assert await within(viewer.recv()) == KEY_EVENT

    async def scenario() -> None:
        async with tcp_upstream(server) as upstream:
            resolve_a = to(rfb_key(upstream, "pw-ready1", "vm-a"))
            proxy = ViewerProxy()
            proxy.prepare("vm-a", resolve_a, within=DEADLINE)
            async with controller(proxy, resolve_a) as ctl:
                await within(server.reach(lambda: server.authenticated == 1))
                async with ctl.viewer() as viewer:
                    await session(viewer)
                    assert server.authenticated == 1  # the prepared one: no connection of its own
                async with ctl.viewer() as again:
                    await session(again)
                    assert server.authenticated == 2  # used once: this viewer made its own

    asyncio.run(scenario())


def test_a_viewer_that_comes_while_its_connection_is_being_prepared_waits_for_that_one() -> None:
    server = VncServer("pw-ready3")

    async def scenario() -> None:
        async with tcp_upstream(server) as upstream:
            resolve_a = to(rfb_key(upstream, "pw-ready3", "vm-a"))
            proxy = ViewerProxy()
            async with controller(proxy, resolve_a) as ctl:
                proxy.prepare("vm-a", resolve_a)  # the claim; the viewer follows at once
                async with ctl.viewer() as viewer:
                    await no_auth_handshake(viewer)
                    assert server.authenticated == 1  # one connection: the prepared one

    asyncio.run(scenario())


def test_a_prepared_connection_is_closed_when_dropped_or_not_taken_in_time_and_unused_once_the_vm_closed_it() -> None:
    server = VncServer("pw-ready2")

    async def scenario() -> None:
        async with tcp_upstream(server) as upstream:
            resolve_a = to(rfb_key(upstream, "pw-ready2", "vm-a"))
            proxy = ViewerProxy()
            proxy.prepare("vm-a", resolve_a)
            await within(server.reach(lambda: server.authenticated == 1))
            proxy.drop("vm-a")  # the VM was deleted: its connection goes with it
            await within(server.reach(lambda: server.ended == 1))
            server.close_next = True  # the VM ends the next connection while it waits for its viewer
            proxy.prepare("vm-a", resolve_a)
            await within(server.reach(lambda: server.ended == 2))
            async with controller(proxy, resolve_a) as ctl, ctl.viewer() as viewer:
                await no_auth_handshake(viewer)  # a connection of its own, not the dead one
                assert server.authenticated == 3
            await within(server.reach(lambda: server.ended == 3))
            proxy.prepare("vm-a", resolve_a, within=0.5)
            await within(server.reach(lambda: server.authenticated == 4))
            await within(server.reach(lambda: server.ended == 4))  # its user never came

    asyncio.run(scenario())


def test_rfb_path_a_wrong_password_is_an_rfb_auth_failure() -> None:
    async def scenario() -> None:
        async with tcp_upstream(VncServer("right-pw")) as upstream, \
                controller(ViewerProxy(), to(rfb_at(upstream, "wrong-pw"))) as ctl, ctl.viewer() as viewer:
            assert await close_of(viewer) == (
                4502, "rfb.auth: the VNC server refused the VM's password: password check failed")

    asyncio.run(scenario())


def test_rfb_path_a_vnc_server_that_closes_at_once_is_an_rfb_banner_failure() -> None:
    async def closes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def scenario() -> None:
        async with tcp_upstream(closes) as upstream, controller(ViewerProxy(), to(rfb_at(upstream))) as ctl, \
                ctl.viewer() as viewer:
            assert await close_of(viewer) == (4502, "rfb.banner: the VNC server closed the connection before it spoke")

    asyncio.run(scenario())


def test_rfb_path_a_silent_vnc_server_times_out_as_rfb_banner() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def scenario() -> None:
        async with tcp_upstream(silent) as upstream, \
                controller(ViewerProxy(connect_timeout=0.5), to(rfb_at(upstream))) as ctl, ctl.viewer() as viewer:
            assert await close_of(viewer) == (4502, "rfb.banner: nothing came within 0.5 s: the VNC server is silent")

    asyncio.run(scenario())


def test_rfb_path_the_vm_closing_is_1000_and_a_reset_is_1011() -> None:
    async def quits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await reader.readexactly(3)
        writer.close()

    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await reader.readexactly(3)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
        writer.transport.abort()

    async def ends(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> tuple[
            int | None, str | None]:
        async with tcp_upstream(handler) as upstream, controller(ViewerProxy(), to(rfb_at(upstream))) as ctl, \
                ctl.viewer() as viewer:
            assert await within(viewer.recv()) == BANNER
            await viewer.send(b"bye")
            return await close_of(viewer)

    assert asyncio.run(ends(quits)) == (1000, "the VM's desktop closed the connection")
    code, reason = asyncio.run(ends(resets))
    assert code == 1011 and reason == "the connection to the VM failed: Connection reset by peer"
