"""The viewer on the default rfb path: through the controller's proxy against a viewer connected
straight to the same x11vnc, in the same run.

Run: .venv/bin/python bench/viewer_bench.py [--quick] [--seconds S] [--rounds N]

No guest: two Xvfb displays on this host, each with a real x11vnc asking for a VNC password
(-passwdfile, the guest's flags: -forever -shared -nonap) and an X client of this script drawing
on it; the controller (uvicorn + ViewerProxy as the service runs it, Upstream(websocket=False,
vnc_password=...): the rfb path) in a process of its own. This process is the viewers, one RFB
client over four transports:

    tcp      straight to x11vnc on TCP, doing the VNC authentication itself (a native viewer)
    ws       straight to x11vnc's own WebSocket (libvncserver answers an upgrade on its RFB port):
             a browser viewer connected straight to x11vnc, the same client code as through the
             proxy; the baseline the ratios are against
    proxy    ws:// to the controller, which authenticates to x11vnc and relays
    relay    TCP to x11vnc through the plainest relay there is: a process of its own whose two
             threads only recv_into a buffer and sendall it (no framing, no checks, no event
             loop; the kernel's copies and one more process to schedule). What any relay in the
             path costs on the machine at hand: relay/tcp bounds what proxy/ws can reach here

    throughput    display "flood", redrawn whole ~30 times a second: the client asks for the whole
                  1280x800 screen non-incrementally, Raw encoding (bytes are pixels), and asks for
                  the next as the previous one's header arrives; MiB/s of pixels over --seconds,
                  best of --rounds, transports in turn; the controller's CPU seconds per GiB. This
                  x11vnc runs with -wait 1 -defer 1 (FLAGS): with the guest's 20 ms cycle every
                  path gets the same ~40 frames/s and the ratio says nothing. Even so a run lands in
                  one of two modes, depending on whether x11vnc sees the next request before its
                  cycle turns: best of several runs, and the median of each round's proxy/ws and
                  relay/tcp (each pair measured one after the other). The first client x11vnc serves after it starts
                  gets the fast mode whichever transport it is (1,300-2,000 against 800-1,100 MiB/s
                  for every later one): a discarded run goes first. And for each process of the
                  path (this viewer, x11vnc, the controller or the relay), the CPU it ran and the time it waited
                  runnable for a CPU (/proc/PID/task/*/schedstat), per second of streaming: on a
                  shared machine a relay costs its own CPU and one more process to be scheduled at
                  every hand-over, and the waits show how much of the gap that is
    round trip    display "echo": an xvp message of a version x11vnc does not speak, which it answers
                  at once ("fail"): what the path adds; and a FramebufferUpdateRequest of one pixel,
                  non-incremental, answered with that pixel on x11vnc's next ~20 ms cycle (each sent
                  at a random point of it); median and p99, the four in turn
    key to pixels display "echo", whose window repaints a 16x16 square on each key press: with an
                  incremental request waiting, a KeyEvent (down, up) to the FramebufferUpdate holding
                  the repainted square; p50, p95, the four in turn

Targets, printed beside the results (issue 22): throughput >= 0.95x direct, <= 0.2 ms added median
round trip. Nothing here asserts a time. Every process started here is ended by its id.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import cProfile
import ctypes
import hashlib
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from browservm import rfb
from browservm.api.proxy import UVICORN_WEBSOCKETS, Upstream, ViewerProxy
from browservm.hostnet.netns import NetworkNamespace

GEOMETRY = (1280, 800)  # the viewer's default desktop
PASSWORD = "bench-pw"
MiB = 2**20
GiB = 2**30
TICK = os.sysconf("SC_CLK_TCK")
SQUARE = (8, 8, 16, 16)  # x, y, w, h: what the echo window repaints on a key press
RAW = 0
KEYSYM_A = 0x61
QUIET = 0.1  # seconds without an update: the echo display is still (x11vnc answers within ~20-60 ms)
TRANSPORTS = ("tcp", "ws", "proxy", "relay")
# x11vnc's flags beyond the guest's, per display. The guest's x11vnc polls the screen and answers
# requests every ~20 ms (-wait, -defer): a frame asked for after that cycle began waits for the
# next, and throughput would measure where requests land in x11vnc's cycle, not bytes. For the
# throughput display x11vnc sends as soon as it can; the echo display keeps the guest's timing.
FLAGS = {"flood": ["-wait", "1", "-defer", "1"], "echo": []}


# --- the X clients: ctypes on libX11 (no xterm or xdotool on this host) ------------------------------


def _x11() -> ctypes.CDLL:
    x = ctypes.CDLL("libX11.so.6")
    x.XOpenDisplay.restype = ctypes.c_void_p
    x.XOpenDisplay.argtypes = [ctypes.c_char_p]
    x.XDefaultScreen.argtypes = [ctypes.c_void_p]
    x.XRootWindow.restype = ctypes.c_ulong
    x.XRootWindow.argtypes = [ctypes.c_void_p, ctypes.c_int]
    x.XCreateSimpleWindow.restype = ctypes.c_ulong
    x.XCreateSimpleWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_int, ctypes.c_uint,
                                      ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong, ctypes.c_ulong]
    x.XSelectInput.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long]
    x.XMapWindow.argtypes = [ctypes.c_void_p, ctypes.c_ulong]
    x.XDefaultGC.restype = ctypes.c_void_p
    x.XDefaultGC.argtypes = [ctypes.c_void_p, ctypes.c_int]
    x.XSetForeground.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_ulong]
    x.XFillRectangle.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_uint, ctypes.c_uint]
    x.XSync.argtypes = [ctypes.c_void_p, ctypes.c_int]
    x.XNextEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    x.XSetInputFocus.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong]
    return x


def _drawer(display: str, mode: str) -> None:
    """A window over the whole screen. flood: repainted whole, in stripes of changing colours, ~30
    times a second. echo: a 16x16 square toggled white/black on each key press (an xterm echoing)."""
    x = _x11()
    dpy = x.XOpenDisplay(display.encode())
    if not dpy:
        raise RuntimeError(f"cannot open display {display}")
    screen = x.XDefaultScreen(dpy)
    width, height = GEOMETRY
    window = x.XCreateSimpleWindow(dpy, x.XRootWindow(dpy, screen), 0, 0, width, height, 0, 0, 0x808080)
    key_press, map_notify = 2, 19
    x.XSelectInput(dpy, window, (1 << 0) | (1 << 17))  # KeyPressMask | StructureNotifyMask
    x.XMapWindow(dpy, window)
    event = ctypes.create_string_buffer(192)  # sizeof(XEvent): 24 longs
    while True:
        x.XNextEvent(dpy, event)
        if ctypes.c_int.from_buffer(event).value == map_notify:
            break
    x.XSetInputFocus(dpy, window, 2, 0)  # RevertToParent, CurrentTime: no window manager gives focus
    gc = x.XDefaultGC(dpy, screen)
    x.XSync(dpy, 0)
    print("drawer ready", flush=True)
    if mode == "flood":
        frame = 0
        while True:
            for stripe in range(0, height, 40):
                x.XSetForeground(dpy, gc, (frame * 0x10307 + stripe * 0x20501) & 0xFFFFFF)
                x.XFillRectangle(dpy, window, gc, 0, stripe, width, 40)
            x.XSync(dpy, 0)
            frame += 1
            time.sleep(1 / 30)  # a rate, not a wait for a condition
    white = False
    while True:
        x.XNextEvent(dpy, event)
        if ctypes.c_int.from_buffer(event).value == key_press:
            white = not white
            x.XSetForeground(dpy, gc, 0xFFFFFF if white else 0)
            x.XFillRectangle(dpy, window, gc, *SQUARE)
            x.XSync(dpy, 0)


# --- the controller process ---------------------------------------------------------------------------


def _controller(listen_fd: int, profile: str | None) -> None:
    """uvicorn + ViewerProxy on the listening socket; with `profile`, under cProfile, its stats written
    there when the bench ends the process (uvicorn turns the SIGTERM into a graceful return)."""
    proxy = ViewerProxy()
    never = asyncio.Event()

    async def vnc(websocket: WebSocket) -> None:
        query = parse_qs(websocket.scope["query_string"].decode())
        upstream = Upstream(NetworkNamespace(None), IPv4Address("127.0.0.1"), int(query["port"][0]),
                            vnc_password=PASSWORD, websocket=False)

        async def resolve() -> Upstream:
            return upstream

        await proxy.serve(websocket, resolve, never)

    app = Starlette(routes=[WebSocketRoute("/v1/vms/{vm_id}/vnc", vnc)])
    server = uvicorn.Server(uvicorn.Config(app, **UVICORN_WEBSOCKETS, lifespan="off", log_level="warning",
                                           timeout_graceful_shutdown=1))
    profiler = cProfile.Profile()
    if profile is None:
        asyncio.run(server.serve(sockets=[socket.socket(fileno=listen_fd)]))
        return

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(0)

    # uvicorn re-raises the SIGTERM it shut down on: leave through `finally` rather than die in the signal
    signal.signal(signal.SIGTERM, leave)
    profiler.enable()
    try:
        asyncio.run(server.serve(sockets=[socket.socket(fileno=listen_fd)]))
    finally:
        profiler.disable()
        profiler.dump_stats(profile)


# --- the plainest relay ---------------------------------------------------------------------------------


def _relay(pairs: list[str]) -> None:
    """For each "FD:PORT": every connection to listening socket FD relayed to x11vnc on PORT by two
    threads, one per direction; the GIL is let go for each syscall, so only the kernel's copies and
    the scheduling of one more process stay."""

    def pump(source: socket.socket, sink: socket.socket) -> None:
        buffer = bytearray(256 * 1024)
        view = memoryview(buffer)
        with contextlib.suppress(OSError):
            while n := source.recv_into(buffer):
                sink.sendall(view[:n])
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def serve(listener: socket.socket, port: int) -> None:
        while True:
            viewer_side, _ = listener.accept()
            vnc_side = socket.create_connection(("127.0.0.1", port))
            for sock in (viewer_side, vnc_side):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=pump, args=(viewer_side, vnc_side), daemon=True).start()
            threading.Thread(target=pump, args=(vnc_side, viewer_side), daemon=True).start()

    servers = []
    for pair in pairs:
        fd, port = pair.split(":")
        servers.append(threading.Thread(target=serve, args=(socket.socket(fileno=int(fd)), int(port)), daemon=True))
        servers[-1].start()
    for server in servers:
        server.join()  # until the bench ends this process


# --- processes ----------------------------------------------------------------------------------------


@dataclass
class Desktop:
    display: str
    vnc_port: int
    vnc_pid: int  # x11vnc's
    relay_port: int  # the plain relay's to this x11vnc


@dataclass
class Setup:
    controller_pid: int
    controller_port: int
    relay_pid: int
    flood: Desktop
    echo: Desktop


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (its fields after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def _scheduled(pid: int) -> tuple[float, float]:
    """Seconds a process's threads ran, and waited runnable for a CPU, from /proc/PID/task/*/schedstat."""
    ran = waited = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            fields = (task / "schedstat").read_text().split()
            ran += int(fields[0])
            waited += int(fields[1])
    return ran / 1e9, waited / 1e9


def _free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port: int = sock.getsockname()[1]
        return port


def _line(proc: subprocess.Popen[bytes], log: Path, marker: bytes, what: str, timeout: float = 30.0) -> None:
    """Returns once `proc`'s output (in `log`) holds `marker`, within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker in log.read_bytes():
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}) before it said {marker!r}: "
                               f"{log.read_bytes()[-2000:]!r}")
        time.sleep(0.05)  # a log file gives nothing to wait on
    raise RuntimeError(f"{what} did not say {marker!r} within {timeout:g} s: {log.read_bytes()[-2000:]!r}")


@contextlib.contextmanager
def processes(scratch: Path, profile: Path | None = None) -> Iterator[Setup]:
    started: list[subprocess.Popen[bytes]] = []
    me = [sys.executable, str(Path(__file__).resolve())]
    password_file = scratch / "vnc.pass"
    password_file.write_text(PASSWORD + "\n")
    password_file.chmod(0o600)

    def spawn(argv: list[str], name: str, pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen[bytes], Path]:
        """`argv` with its output in scratch/name.log (a pipe nobody reads would stop x11vnc once full)."""
        log = scratch / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, pass_fds=pass_fds)
        started.append(popen)
        return popen, log

    relay_listeners: list[socket.socket] = []

    def desktop(mode: str) -> Desktop:
        read_end, write_end = os.pipe()
        try:
            spawn(["Xvfb", "-screen", "0", f"{GEOMETRY[0]}x{GEOMETRY[1]}x24", "-nolisten", "tcp",
                   "-displayfd", str(write_end)], f"xvfb-{mode}", pass_fds=(write_end,))
            os.close(write_end)
            with os.fdopen(read_end, "rb") as reader:
                number = reader.readline().strip().decode()
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(write_end)
            raise
        if not number:
            raise RuntimeError("Xvfb exited before it gave its display number")
        display = f":{number}"
        drawer, log = spawn([*me, "--role", "drawer", display, mode], f"drawer-{mode}")
        _line(drawer, log, b"drawer ready", f"the {mode} drawer")
        port = _free_port()
        x11vnc, log = spawn(["x11vnc", "-display", display, "-rfbport", str(port), "-localhost", "-forever", "-shared",
                        "-nonap", "-passwdfile", f"read:{password_file}", *FLAGS[mode]], f"x11vnc-{mode}")
        _line(x11vnc, log, b"PORT=", f"x11vnc on {display}")
        relay_listeners.append(socket.create_server(("127.0.0.1", 0)))
        return Desktop(display, port, x11vnc.pid, relay_listeners[-1].getsockname()[1])

    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    try:
        flood, echo = desktop("flood"), desktop("echo")
        profiling = [str(profile)] if profile else []
        controller, _ = spawn([*me, "--role", "controller", str(listener.fileno()), *profiling], "controller",
                              pass_fds=(listener.fileno(),))
        pairs = [f"{relayed.fileno()}:{d.vnc_port}" for relayed, d in zip(relay_listeners, (flood, echo), strict=True)]
        relay, _ = spawn([*me, "--role", "relay", *pairs], "relay", pass_fds=tuple(r.fileno() for r in relay_listeners))
        yield Setup(controller.pid, listener.getsockname()[1], relay.pid, flood, echo)
    finally:
        for popen in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait(timeout=5)
        listener.close()
        for relayed in relay_listeners:
            relayed.close()


# --- the viewer: one RFB client over three transports ------------------------------------------------


class Stream:
    """Exact reads over chunks as they come (TCP reads or WebSocket messages); big reads are joined once."""

    def __init__(self, receive: Callable[[], Awaitable[bytes]], send: Callable[[bytes], Awaitable[None]]) -> None:
        self._receive = receive
        self.send = send
        self._chunks: list[bytes] = []
        self._have = 0

    async def read(self, n: int) -> bytes:
        while self._have < n:
            chunk = await self._receive()
            self._chunks.append(chunk)
            self._have += len(chunk)
        joined = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        self._chunks = [joined[n:]] if len(joined) > n else []
        self._have -= n
        return joined[:n]

    async def skip(self, n: int) -> None:
        """Read and drop n bytes without joining them (pixels counted, not looked at)."""
        while n > 0:
            if not self._chunks:
                chunk = await self._receive()
                self._chunks.append(chunk)
                self._have += len(chunk)
            first = self._chunks[0]
            if len(first) <= n:
                self._chunks.pop(0)
                self._have -= len(first)
                n -= len(first)
            else:
                self._chunks[0] = first[n:]
                self._have -= n
                n = 0


@dataclass
class Viewer:
    stream: Stream
    width: int
    height: int
    bpp: int  # bytes per pixel


async def _rfb_session(stream: Stream, authenticate: bool) -> Viewer:
    version = await stream.read(12)
    reader = rfb.MessageReader(lambda: stream.read(1))
    if authenticate:
        await rfb.authenticate(reader, stream.send, version, PASSWORD)
    else:
        await stream.send(rfb.VERSION)
        count = (await stream.read(1))[0]
        types = await stream.read(count)
        if rfb.NO_AUTH not in types:
            raise RuntimeError(f"the proxy offered security types {list(types)}")
        await stream.send(bytes([rfb.NO_AUTH]))
        if await stream.read(4) != b"\0\0\0\0":
            raise RuntimeError("the proxy's SecurityResult was not OK")
    await stream.send(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", await stream.read(4))
    pixel_format = await stream.read(16)
    (name_length,) = struct.unpack(">I", await stream.read(4))
    await stream.read(name_length)
    await stream.send(struct.pack(">BxHi", 2, 1, RAW))  # SetEncodings: Raw only
    return Viewer(stream, width, height, pixel_format[0] // 8)


class RawWebSocket:
    """The viewer's end of a WebSocket, cheap per message as a browser's is (the `websockets` client
    costs this process more CPU per MiB than the proxy costs the controller, and on 2 cores that
    would be what the ws and proxy runs measured). Binary messages, no extensions; what it sends is
    masked with a zero key (the frame format RFC 6455 asks of a client, the bytes unchanged)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, port: int, path: str) -> RawWebSocket:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        # libvncserver refuses an upgrade without Origin ("incomplete client handshake"); browsers always send one
        writer.write((f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: http://127.0.0.1\r\n"
                      f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: binary\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        if not head.startswith(b"HTTP/1.1 101") or accept not in head:
            writer.close()
            raise RuntimeError(f"the upgrade to {path} on port {port} was answered {head[:200]!r}")
        return cls(reader, writer)

    async def receive(self) -> bytes:
        """The next data frame's payload (answering pings on the way)."""
        while True:
            first, second = await self._reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack(">H", await self._reader.readexactly(2))
            elif length == 127:
                (length,) = struct.unpack(">Q", await self._reader.readexactly(8))
            payload = await self._reader.readexactly(length) if length else b""
            opcode = first & 0x0F
            if opcode in (0, 1, 2):
                return payload
            if opcode == 8:
                raise ConnectionError(f"the WebSocket was closed: {payload[:2].hex()} {payload[2:]!r}")
            if opcode == 9:
                self._frame(10, payload)

    def _frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack(">BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack(">BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack(">BBQ", 0x80 | opcode, 0x80 | 127, n)
        self._writer.write(header + b"\0\0\0\0" + payload)

    async def send(self, data: bytes) -> None:
        self._frame(2, data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


@contextlib.asynccontextmanager
async def viewer(setup: Setup, desktop: Desktop, transport: str) -> AsyncIterator[Viewer]:
    if transport in ("tcp", "relay"):
        port = desktop.vnc_port if transport == "tcp" else desktop.relay_port
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def send(data: bytes) -> None:
            writer.write(data)
            await writer.drain()

        async def receive() -> bytes:
            data = await reader.read(1 << 20)
            if not data:
                raise ConnectionError("x11vnc closed the connection")
            return data

        try:
            yield await _rfb_session(Stream(receive, send), authenticate=True)
        finally:
            writer.close()
        return
    if transport == "ws":
        websocket = await RawWebSocket.open(desktop.vnc_port, "/websockify")
    else:
        websocket = await RawWebSocket.open(setup.controller_port, f"/v1/vms/bench/vnc?port={desktop.vnc_port}")
    try:
        yield await _rfb_session(Stream(websocket.receive, websocket.send), authenticate=transport == "ws")
    finally:
        websocket.close()


def _request(incremental: bool, x: int, y: int, w: int, h: int) -> bytes:
    return struct.pack(">BBHHHH", 3, int(incremental), x, y, w, h)


async def _update_header(stream: Stream) -> int:
    """Skips server messages other than a FramebufferUpdate (x11vnc sends Bell, cut text); its rect count."""
    while True:
        kind = (await stream.read(1))[0]
        if kind == 0:
            (count,) = struct.unpack(">xH", await stream.read(3))
            return int(count)
        if kind == 2:  # Bell
            continue
        if kind == 3:  # ServerCutText
            _, length = struct.unpack(">3sI", await stream.read(7))
            await stream.skip(length)
            continue
        raise RuntimeError(f"server message type {kind} in a Raw-only session")


async def _rects(v: Viewer, count: int, keep: Callable[[int, int, int, int], bool] | None = None
                 ) -> tuple[int, list[tuple[int, int, int, int, bytes]]]:
    """Reads `count` Raw rectangles: (bytes of pixels, the rectangles `keep` wants with their pixels)."""
    kept = []
    total = 0
    for _ in range(count):
        x, y, w, h, encoding = struct.unpack(">HHHHi", await v.stream.read(12))
        if encoding != RAW:
            if encoding == -223:  # DesktopSize pseudo-rectangle: no data
                continue
            raise RuntimeError(f"rectangle encoding {encoding} in a Raw-only session")
        size = w * h * v.bpp
        total += size
        if keep is not None and keep(x, y, w, h):
            kept.append((x, y, w, h, await v.stream.read(size)))
        else:
            await v.stream.skip(size)
    return total, kept


# --- the measurements ---------------------------------------------------------------------------------


@dataclass
class Throughput:
    mib_s: float
    controller_cpu_gib: float | None
    # per process (viewer, x11vnc, controller), CPU seconds per second: ran, and waited runnable for a CPU
    scheduled: dict[str, tuple[float, float]]


async def throughput(setup: Setup, transport: str, seconds: float) -> Throughput:
    async with viewer(setup, setup.flood, transport) as v:
        whole = _request(False, 0, 0, v.width, v.height)
        await v.stream.send(whole)
        for _ in range(3):  # warm up: the first frames pay for x11vnc's first grab
            count = await _update_header(v.stream)
            await v.stream.send(whole)
            await _rects(v, count)
        cpu = _cpu_seconds(setup.controller_pid)
        pids = {"viewer": os.getpid(), "x11vnc": setup.flood.vnc_pid}
        if transport == "proxy":
            pids["controller"] = setup.controller_pid
        if transport == "relay":
            pids["relay"] = setup.relay_pid
        scheduled = {name: _scheduled(pid) for name, pid in pids.items()}
        pixels = 0
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            count = await _update_header(v.stream)
            await v.stream.send(whole)  # the next is asked for while this one's pixels flow
            pixels += (await _rects(v, count))[0]
        elapsed = time.perf_counter() - started
        controller = (_cpu_seconds(setup.controller_pid) - cpu) / (pixels / GiB) if transport == "proxy" else None
        for name, (ran, waited) in scheduled.items():
            now_ran, now_waited = _scheduled(pids[name])
            scheduled[name] = ((now_ran - ran) / elapsed, (now_waited - waited) / elapsed)
    return Throughput(pixels / MiB / elapsed, controller, scheduled)


XVP_QUERY = struct.pack(">BxBB", 250, 2, 1)  # xvp version 2: libvncserver answers "fail" at once
XVP_FAIL = struct.pack(">BxBB", 250, 2, 0)


async def round_trips(setup: Setup, count: int, xvp: bool) -> dict[str, list[float]]:
    """Milliseconds per one-pixel update request answered (xvp: per xvp message answered), per
    transport, the four in turn."""
    times: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    async with contextlib.AsyncExitStack() as stack:
        viewers = {t: await stack.enter_async_context(viewer(setup, setup.echo, t)) for t in TRANSPORTS}
        corner = _request(False, GEOMETRY[0] - 1, GEOMETRY[1] - 1, 1, 1)
        for i in range(10 + count):  # the first 10 warm the path up and are not counted
            for transport, v in viewers.items():
                started = time.perf_counter_ns()
                if xvp:
                    await v.stream.send(XVP_QUERY)
                    answer = await v.stream.read(4)
                    if answer != XVP_FAIL:
                        raise RuntimeError(f"x11vnc answered xvp with {answer!r}")
                else:
                    # At a random point of x11vnc's ~20 ms cycle: sent in turn, each request would land
                    # at the same phase of it each time, and that phase, not the path, would decide.
                    await asyncio.sleep(random.uniform(0, 0.025))
                    started = time.perf_counter_ns()
                    await v.stream.send(corner)
                    await _rects(v, await _update_header(v.stream))
                if i >= 10:
                    times[transport].append((time.perf_counter_ns() - started) / 1e6)
    return times


def _in_square(x: int, y: int, w: int, h: int) -> bool:
    sx, sy, sw, sh = SQUARE
    return x <= sx and y <= sy and x + w >= sx + sw and y + h >= sy + sh


async def _settle(v: Viewer) -> None:
    """Reads updates until the screen has been quiet for QUIET seconds (x11vnc's first full one, echoes
    of other viewers' keys), leaving one incremental request waiting."""
    while True:
        await v.stream.send(_request(True, 0, 0, v.width, v.height))
        try:
            async with asyncio.timeout(QUIET):
                count = await _update_header(v.stream)
        except TimeoutError:
            return
        await _rects(v, count)


def _white(v: Viewer, rect: tuple[int, int, int, int, bytes]) -> bool:
    """Whether the square's first pixel in `rect` (which holds the square) is the echo's white."""
    x, y, w, _, pixels = rect
    at = ((SQUARE[1] - y) * w + SQUARE[0] - x) * v.bpp
    return pixels[at:at + v.bpp].count(0xFF) >= 3


async def key_to_pixels(setup: Setup, count: int) -> dict[str, list[float]]:
    """Milliseconds from a KeyEvent to the update with the echo window's repainted square, per transport.
    Each viewer sees every key (the screen is shared): each waits for quiet before its own key, and
    counts only the square in the colour its own key made (a late echo of an earlier one is not it)."""
    times: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
    presses = 0
    async with contextlib.AsyncExitStack() as stack:
        viewers = {t: await stack.enter_async_context(viewer(setup, setup.echo, t)) for t in TRANSPORTS}
        for v in viewers.values():
            await v.stream.send(_request(False, 0, 0, v.width, v.height))
            await _rects(v, await _update_header(v.stream))
        for i in range(3 + count):
            for transport, v in viewers.items():
                for other in viewers.values():
                    await _settle(other)
                started = time.perf_counter_ns()
                await v.stream.send(struct.pack(">BBxxI", 4, 1, KEYSYM_A) + struct.pack(">BBxxI", 4, 0, KEYSYM_A))
                presses += 1
                while True:
                    _, kept = await _rects(v, await _update_header(v.stream), _in_square)
                    if any(_white(v, rect) == (presses % 2 == 1) for rect in kept):
                        break
                    await v.stream.send(_request(True, 0, 0, v.width, v.height))
                if i >= 3:
                    times[transport].append((time.perf_counter_ns() - started) / 1e6)
    return times


# --- the report ---------------------------------------------------------------------------------------


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip()


def _latency_row(name: str, p: dict[str, float], target: str) -> None:
    print(f"  {name:<16} {p['tcp']:>7.3f}   {p['ws']:>7.3f}   {p['proxy']:>7.3f}   {p['relay']:>7.3f}   "
          f"{p['proxy'] - p['ws']:>+9.3f}{target:<10}  {p['proxy'] - p['tcp']:>+8.3f}"
          f"     {p['relay'] - p['tcp']:>+8.3f}")


async def bench(args: argparse.Namespace, setup: Setup) -> None:
    seconds = 2.0 if args.quick else args.seconds
    trips = 200 if args.quick else 1000  # xvp; the update requests wait for x11vnc's ~20 ms cycle: a third
    keys = 30 if args.quick else 100
    print(f"viewer bench (rfb path): {GEOMETRY[0]}x{GEOMETRY[1]} Raw, {seconds:g} s per throughput run (best of "
          f"{args.rounds}), {trips} round trips, {keys} keys; /proc/loadavg {_load()} on {os.cpu_count()} CPUs")
    print("  tcp: straight to x11vnc on TCP; ws: straight to x11vnc's own WebSocket (the baseline);"
          " proxy: ws:// through the controller;\n  relay: TCP through the plainest relay process (what any relay"
          " costs here: relay/tcp bounds proxy/ws)\n")

    await throughput(setup, "tcp", 1.0)  # x11vnc's first client, faster than any later one: not counted
    runs: dict[str, list[Throughput]] = {t: [] for t in TRANSPORTS}
    for _ in range(args.rounds):  # in turn, so a neighbour's burst hits all alike
        for transport in TRANSPORTS:
            runs[transport].append(await throughput(setup, transport, seconds))
    best = {t: max(r.mib_s for r in runs[t]) for t in TRANSPORTS}
    cpu = min(r.controller_cpu_gib for r in runs["proxy"] if r.controller_cpu_gib is not None)
    proxied = sorted(p.mib_s / w.mib_s for p, w in zip(runs["proxy"], runs["ws"], strict=True))
    relayed = sorted(r.mib_s / t.mib_s for r, t in zip(runs["relay"], runs["tcp"], strict=True))
    print("throughput, MiB/s     tcp        ws     proxy     relay   proxy/ws (>= 0.95)   relay/tcp   "
          "controller CPU s/GiB")
    print(f"  x11vnc -> viewer {best['tcp']:>7.1f}   {best['ws']:>7.1f}   {best['proxy']:>7.1f}   {best['relay']:>7.1f}"
          f"   {best['proxy'] / best['ws']:>8.2f}             {best['relay'] / best['tcp']:>6.2f}      {cpu:>10.2f}")
    for name, ratios in (("proxy/ws", proxied), ("relay/tcp", relayed)):
        print(f"  {name} per round: {' '.join(f'{r:.2f}' for r in ratios)} (median {ratios[len(ratios) // 2]:.2f})")
    # Each hop is a process the scheduler must run: on a busy machine the wait for a CPU, not the
    # CPU itself, is what a relay adds most (the proxy's extra process, and the others' longer waits).
    print("  CPU s/s while streaming, ran + waited runnable for a CPU (median of the runs):")
    for transport in TRANSPORTS:
        named = runs[transport][0].scheduled
        line = "   ".join(f"{name} {_percentile([r.scheduled[name][0] for r in runs[transport]], 0.5):.2f}"
                           f" + {_percentile([r.scheduled[name][1] for r in runs[transport]], 0.5):.2f}"
                           for name in named)
        print(f"    {transport:<6} {line}")

    header = "                       tcp        ws     proxy     relay   added vs ws   added vs tcp   relay added"
    for xvp, what in ((True, "xvp message (answered at once)"), (False, "1-pixel update request")):
        n = trips if xvp else trips // 3
        rt = await round_trips(setup, n, xvp)
        print(f"\nround trip, {what}, ms ({n} of each, in turn)")
        print(header)
        for name, fraction in (("median", 0.5), ("p99", 0.99)):
            _latency_row(name, {t: _percentile(rt[t], fraction) for t in TRANSPORTS},
                         "  (<= 0.2)" if name == "median" else "")

    kp = await key_to_pixels(setup, keys)
    print(f"\nkey to pixels, ms ({keys} keys on each, in turn)")
    print(header)
    for name, fraction in (("p50", 0.5), ("p95", 0.95)):
        _latency_row(name, {t: _percentile(kp[t], fraction) for t in TRANSPORTS}, "")
    print(f"\n/proc/loadavg at the end: {_load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s runs, 200 round trips, 30 keys")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per transport (best counts)")
    parser.add_argument("--profile-controller", type=Path, metavar="FILE",
                        help="run the controller under cProfile, its stats written to FILE (python -m pstats FILE)")
    parser.add_argument("--role", nargs="+", help=argparse.SUPPRESS)  # how this script runs its own children
    args = parser.parse_args()
    if args.role:
        role, *rest = args.role
        if role == "drawer":
            _drawer(rest[0], rest[1])
        elif role == "relay":
            _relay(rest)
        else:
            _controller(int(rest[0]), rest[1] if len(rest) > 1 else None)
        return
    for program in ("Xvfb", "x11vnc"):
        if not any((Path(d) / program).exists() for d in os.environ.get("PATH", "").split(":")):
            sys.exit(f"{program} is not installed (apt-get install xvfb x11vnc)")
    with tempfile.TemporaryDirectory(prefix="viewer_bench.") as scratch:
        try:
            with processes(Path(scratch), args.profile_controller) as setup:
                asyncio.run(bench(args, setup))
        except BaseException:
            for log in sorted(Path(scratch).glob("*.log")):
                print(f"--- {log.name} (tail):\n{log.read_text(errors='replace')[-1500:]}", file=sys.stderr)
            raise


if __name__ == "__main__":
    main()
