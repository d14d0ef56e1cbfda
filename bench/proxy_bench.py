"""The viewer proxy (browservm.api.proxy) against a direct connection to the same websockify.

Run: .venv/bin/python bench/proxy_bench.py [--quick] [--rounds N]

Four processes besides this one: the controller (uvicorn + ViewerProxy, as the service runs it,
permessage-deflate off), Debian's websockify, and a "VM" process with websockify's target (a
source, sink and echo behind one small protocol) and a WebSocket server that holds idle viewers.
This process is the viewers. All on 127.0.0.1; every process is ended by its id at the end.

    throughput   200 MiB each way through websockify, direct and through the controller: MiB/s,
                 and CPU seconds per GiB of the controller (on 2 shared cores, CPU per GiB is the
                 number that compares across runs; MiB/s moves with the neighbours' load)
    latency      1,000 round trips of 64 bytes: median and p99, direct and through the controller
    idle         500 viewers held open through the controller: its RSS growth per viewer, and the
                 time to open them all

Targets, printed next to the results: >= 90% of direct throughput, <= 0.5 ms added median round
trip, <= 64 KiB per idle viewer. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from browservm.api.proxy import UVICORN_WEBSOCKETS, Direction, Upstream, ViewerProxy
from browservm.hostnet.netns import NetworkNamespace

WEBSOCKIFY = "/usr/bin/websockify"
BANNER = b"RFB 003.008\n"
MiB = 2**20
GiB = 2**30
CHUNK = 64 * 1024  # a viewer's message size for bulk data; websockify reads 64 KiB at a time too
SMALL = 64  # a round trip's message: a key or pointer event is 8 bytes, an update request 10
TICK = os.sysconf("SC_CLK_TCK")


# --- the VM process: websockify's target and an upstream for idle viewers ---------------------------


async def _vm_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Banner, then commands of 9 bytes: b"S" + n (send n bytes), b"R" + n (read n, answer b"K"),
    b"E" (echo until the viewer goes)."""
    block = os.urandom(256 * 1024)
    writer.write(BANNER)
    try:
        while True:
            command = await reader.readexactly(9)
            op, n = command[:1], int.from_bytes(command[1:], "big")
            if op == b"S":
                while n > 0:
                    writer.write(block[:n])
                    n -= min(n, len(block))
                    await writer.drain()
            elif op == b"R":
                while n > 0:
                    data = await reader.read(min(n, 256 * 1024))
                    if not data:
                        return
                    n -= len(data)
                writer.write(b"K")
            elif op == b"E":
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def _vm(target_fd: int, idle_fd: int) -> None:
    async def idle(connection: ServerConnection) -> None:
        await connection.send(BANNER)
        await connection.wait_closed()

    target = socket.socket(fileno=target_fd)
    idle_sock = socket.socket(fileno=idle_fd)
    async with await asyncio.start_server(_vm_target, sock=target), \
            serve(idle, sock=idle_sock, compression=None, ping_interval=None, max_size=MiB):
        await asyncio.Future()  # until the bench ends this process


# --- the controller process ---------------------------------------------------------------------------


def _controller(listen_fd: int) -> None:
    class Counters:
        """What a service's metrics would do per call: a dictionary update."""

        def __init__(self) -> None:
            self.counts = {"opened": 0, "closed": 0, "to_vm": 0, "to_viewer": 0}

        def opened(self) -> None:
            self.counts["opened"] += 1

        def closed(self, code: int) -> None:
            self.counts["closed"] += 1

        def bytes(self, direction: Direction, n: int) -> None:
            self.counts[direction] += n

    proxy = ViewerProxy(Counters())
    never = asyncio.Event()

    async def vnc(websocket: WebSocket) -> None:
        query = parse_qs(websocket.scope["query_string"].decode())
        upstream = Upstream(NetworkNamespace(None), IPv4Address("127.0.0.1"), int(query["port"][0]),
                            query.get("path", ["/websockify"])[0], websocket=True)

        async def resolve() -> Upstream:
            return upstream

        await proxy.serve(websocket, resolve, never)

    app = Starlette(routes=[WebSocketRoute("/v1/vms/{vm_id}/vnc", vnc)])
    server = uvicorn.Server(uvicorn.Config(app, **UVICORN_WEBSOCKETS, lifespan="off", log_level="warning",
                                           timeout_graceful_shutdown=1))
    asyncio.run(server.serve(sockets=[socket.socket(fileno=listen_fd)]))


# --- processes ----------------------------------------------------------------------------------------


@dataclass
class Process:
    popen: subprocess.Popen[bytes]
    group: bool = False  # its own process group, with children of its own (websockify)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            if self.group:
                os.killpg(self.pid, signal.SIGTERM)
            else:
                self.popen.terminate()
        try:
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                if self.group:
                    os.killpg(self.pid, signal.SIGKILL)
                else:
                    self.popen.kill()
            self.popen.wait(timeout=5)


def _listener(backlog: int = 1024) -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=backlog)


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (its fields after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Setup:
    controller: Process
    websockify: Process
    controller_port: int
    websockify_port: int
    idle_port: int

    def url(self, via_proxy: bool, *, idle: bool = False) -> str:
        if idle:
            return f"ws://127.0.0.1:{self.controller_port}/v1/vms/bench/vnc?port={self.idle_port}&path=/"
        if via_proxy:
            return f"ws://127.0.0.1:{self.controller_port}/v1/vms/bench/vnc?port={self.websockify_port}"
        return f"ws://127.0.0.1:{self.websockify_port}/websockify"


@contextlib.contextmanager
def processes(log: Path) -> Iterator[Setup]:
    """The controller, websockify and the VM process, each on a listening socket made here, so all
    accept (into their backlogs) before they have even started."""
    started: list[Process] = []
    sockets = {name: _listener() for name in ("controller", "websockify", "target", "idle")}
    me = [sys.executable, str(Path(__file__).resolve())]
    try:
        with log.open("wb") as out:
            def spawn(argv: list[str], fds: tuple[int, ...], *, group: bool = False,
                      stdin: int | None = None) -> Process:
                popen = subprocess.Popen(argv, pass_fds=fds, stdin=stdin, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=group)
                started.append(Process(popen, group))
                return started[-1]

            target, idle = sockets["target"].fileno(), sockets["idle"].fileno()
            spawn([*me, "--role", "vm", str(target), str(idle)], (target, idle))
            controller_fd = sockets["controller"].fileno()
            controller = spawn([*me, "--role", "controller", str(controller_fd)], (controller_fd,))
            websockify = spawn([WEBSOCKIFY, "--inetd", f"127.0.0.1:{_port(sockets['target'])}"], (),
                               group=True, stdin=sockets["websockify"].fileno())
        yield Setup(controller, websockify, _port(sockets["controller"]), _port(sockets["websockify"]),
                    _port(sockets["idle"]))
    finally:
        for process in reversed(started):
            process.end()
        for sock in sockets.values():
            sock.close()


# --- the viewers --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def viewer(url: str) -> AsyncIterator[ClientConnection]:
    """A viewer as noVNC is one: binary, no compression; the banner read."""
    async with connect(url, compression=None, proxy=None, subprotocols=[Subprotocol("binary")], max_size=None,
                       ping_interval=None, open_timeout=60) as connection:
        first = await connection.recv(decode=False)
        if first != BANNER:
            raise RuntimeError(f"expected the banner, got {first[:40]!r}")
        yield connection


def _command(op: bytes, n: int = 0) -> bytes:
    return op + n.to_bytes(8, "big")


async def _read(connection: ClientConnection, n: int) -> None:
    while n > 0:
        n -= len(await connection.recv(decode=False))


@dataclass
class Transfer:
    mib_s: float
    controller_cpu_gib: float | None  # CPU seconds per GiB, None when direct
    websockify_cpu_gib: float | None  # of websockify's per-connection process, when it can be found
    client_cpu_gib: float


async def transfer(setup: Setup, via_proxy: bool, to_viewer: bool, size: int) -> Transfer:
    async with viewer(setup.url(via_proxy)) as connection:
        handlers = _children(setup.websockify.pid)
        handler = handlers[-1] if len(handlers) == 1 else None  # ambiguous if an earlier one lingers
        cpu = {"controller": _cpu_seconds(setup.controller.pid),
               "websockify": _cpu_seconds(handler) if handler else 0.0, "client": time.process_time()}
        started = time.perf_counter()
        if to_viewer:
            await connection.send(_command(b"S", size))
            await _read(connection, size)
        else:
            await connection.send(_command(b"R", size))
            chunk = os.urandom(CHUNK)
            for offset in range(0, size, CHUNK):
                await connection.send(chunk[:size - offset])
            if await connection.recv(decode=False) != b"K":
                raise RuntimeError("the sink did not confirm")
        elapsed = time.perf_counter() - started
        gib = size / GiB
        websockify_cpu = None
        if handler is not None:
            with contextlib.suppress(OSError):
                websockify_cpu = (_cpu_seconds(handler) - cpu["websockify"]) / gib
        return Transfer(size / MiB / elapsed,
                        (_cpu_seconds(setup.controller.pid) - cpu["controller"]) / gib if via_proxy else None,
                        websockify_cpu, (time.process_time() - cpu["client"]) / gib)


async def round_trips(setup: Setup, count: int) -> tuple[list[float], list[float]]:
    """Milliseconds per round trip of a 64-byte message through websockify's echo, (direct, proxied):
    one of each in turn, so both see the same moments of the neighbours' load."""
    message = os.urandom(SMALL)
    times: tuple[list[float], list[float]] = ([], [])
    async with viewer(setup.url(False)) as direct, viewer(setup.url(True)) as proxied:
        for connection in (direct, proxied):
            await connection.send(_command(b"E"))
        for i in range(10 + count):  # the first 10 warm the path up and are not counted
            for connection, kept in ((direct, times[0]), (proxied, times[1])):
                started = time.perf_counter_ns()
                await connection.send(message)
                await _read(connection, SMALL)
                if i >= 10:
                    kept.append((time.perf_counter_ns() - started) / 1e6)
    return times


async def idle_viewers(setup: Setup, count: int) -> tuple[float, int]:
    """Open `count` viewers through the controller at once (100 handshakes in flight at most) and
    hold them; (seconds to open them all, the controller's RSS growth in bytes)."""
    url = setup.url(True, idle=True)
    for _ in range(20):  # the first connections pay for imports and caches, not for a viewer
        async with viewer(url):
            pass
    before = _rss(setup.controller.pid)
    opened: list[ClientConnection] = []
    in_flight = asyncio.Semaphore(100)
    async with contextlib.AsyncExitStack() as stack:
        async def open_one() -> None:
            async with in_flight:
                opened.append(await stack.enter_async_context(viewer(url)))

        started = time.perf_counter()
        await asyncio.gather(*(open_one() for _ in range(count)))
        elapsed = time.perf_counter() - started
        growth = _rss(setup.controller.pid) - before
    return elapsed, growth


# --- the report ---------------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


async def bench(args: argparse.Namespace, setup: Setup) -> None:
    size = (32 if args.quick else 200) * MiB
    trips = 200 if args.quick else 1000
    idle = 100 if args.quick else 500
    print(f"proxy bench: {size // MiB} MiB each way (best of {args.rounds}), {trips} round trips, {idle} idle "
          f"viewers; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")

    await transfer(setup, True, True, 4 * MiB)  # warm-up: the controller's first connection imports things
    print("throughput            direct MiB/s   proxy MiB/s   ratio  (>= 0.90)   controller CPU s/GiB   "
          "websockify CPU s/GiB (direct / proxy)")
    for to_viewer, label in ((True, "VM -> viewer"), (False, "viewer -> VM")):
        direct: list[Transfer] = []
        proxied: list[Transfer] = []
        for _ in range(args.rounds):  # interleaved, so a neighbour's burst hits both sides alike
            direct.append(await transfer(setup, False, to_viewer, size))
            proxied.append(await transfer(setup, True, to_viewer, size))
        best_direct = max(t.mib_s for t in direct)
        best_proxy = max(t.mib_s for t in proxied)
        controller_cpu = min(t.controller_cpu_gib for t in proxied if t.controller_cpu_gib is not None)
        ws_direct = min((t.websockify_cpu_gib for t in direct if t.websockify_cpu_gib is not None), default=None)
        ws_proxy = min((t.websockify_cpu_gib for t in proxied if t.websockify_cpu_gib is not None), default=None)
        print(f"  {label:<19} {best_direct:>10.1f}   {best_proxy:>11.1f}   {best_proxy / best_direct:>5.2f}"
              f"              {controller_cpu:>10.2f}             {_cpu(ws_direct)} / {_cpu(ws_proxy)}")
    print("  (when the cores are saturated the throughput ratio is a ratio of CPU per GiB: the proxied chain\n"
          "   has the controller's CPU on top of the same websockify, VM and viewer; compare CPU s/GiB across runs)")

    direct_rt, proxy_rt = await round_trips(setup, trips)
    print(f"\nround trip, {SMALL} B     direct ms   proxy ms   added ms  ({trips} of each, in turn)")
    for name, fraction in (("median", 0.5), ("p99", 0.99)):
        d, p = _percentile(direct_rt, fraction), _percentile(proxy_rt, fraction)
        target = "   (<= 0.5)" if name == "median" else ""
        print(f"  {name:<20} {d:>9.3f}   {p:>8.3f}   {p - d:>8.3f}{target}")

    elapsed, growth = await idle_viewers(setup, idle)
    print(f"\nidle viewers: {idle} opened through the controller in {elapsed:.2f} s "
          f"({elapsed / idle * 1000:.1f} ms each, 100 at a time)")
    print(f"  controller RSS growth: {growth / MiB:.1f} MiB, {growth / idle / 1024:.1f} KiB per viewer   "
          "(<= 64 KiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MiB, 200 round trips, 100 idle viewers")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each throughput run (best counts)")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # how this script runs its own children
    args = parser.parse_args()
    if args.role:
        role, *fds = args.role
        if role == "vm":
            asyncio.run(_vm(int(fds[0]), int(fds[1])))
        else:
            _controller(int(fds[0]))
        return

    if not Path(WEBSOCKIFY).exists():
        sys.exit(f"{WEBSOCKIFY} is not installed (apt-get install websockify)")
    # 500 viewers are 1,000 sockets in the controller; children inherit the raised limit
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory(prefix="proxy_bench.") as scratch:
        log = Path(scratch) / "processes.log"
        try:
            with processes(log) as setup:
                asyncio.run(bench(args, setup))
        except BaseException:
            print(f"--- the processes' output (tail):\n{log.read_text(errors='replace')[-4000:]}", file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
