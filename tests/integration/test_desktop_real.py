"""The guest's desktop supervisor with the real parts, in a namespace: Xvnc, Openbox and websockify (the
full image's), and Xvfb, Openbox, x11vnc and websockify (the minimal image's)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address
from pathlib import Path

import pytest
import websockets.sync.client

from browservm.guest.markers import parse_marker
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.readiness import desktop_banner

from .conftest import Namespaces, run

pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(not all(shutil.which(p) for p in ("Xvnc", "Xvfb", "openbox", "x11vnc", "websockify")),
                       reason="needs tigervnc-standalone-server, xvfb, openbox, x11vnc and websockify "
                              "(scripts/install.sh installs them)"),
]

# Each image's desktop, as rootfs.SERVICES lists it (Chromium aside): the VNC server's part, then all.
DESKTOPS = {"xvnc": ("xvnc", "openbox", "websockify"), "x11vnc": ("xvfb", "openbox", "x11vnc", "websockify")}


@pytest.fixture(params=list(DESKTOPS))
def server(request: pytest.FixtureRequest) -> str:
    """The VNC server the desktop runs."""
    return str(request.param)


@pytest.fixture
def desktop(namespaces: Namespaces, tmp_path: Path, server: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    ns = namespaces.create("desk")
    run("ip", "link", "set", "lo", "up", netns=ns)
    config = tmp_path / "desktop.json"
    config.write_text(json.dumps({"services": list(DESKTOPS[server]), "display": ":87",
                                  "vnc_port": 5987, "novnc_dir": "/usr/share/novnc"}))
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "browservm.guest.desktop",
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        yield ns, proc
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)
    # Whatever happened, nothing the supervisor started may outlive the test.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def test_stopping_the_supervisor_stops_every_part(desktop: tuple[str, subprocess.Popen[str]]) -> None:
    _, proc = desktop
    seen = markers_until(proc, "websockify")
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    for marker in seen.values():
        assert not Path(f"/proc/{marker['pid']}").exists(), f"{marker['service']} outlived the supervisor"


def markers_until(proc: subprocess.Popen[str], service: str) -> dict[str, dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        marker = parse_marker(line)
        if marker and marker[0] == "ready":
            seen[marker[1]["service"]] = marker[1]
            if marker[1]["service"] == service or marker[1]["state"] == "failed":
                return seen
    return seen


async def banner_through_websockify(ns: str) -> str:
    return await desktop_banner(NetworkNamespace(ns), IPv4Address("127.0.0.1"), 6080, 30, websocket=True)


def test_the_desktop_starts_in_order_and_answers_rfb_through_websockify(
        desktop: tuple[str, subprocess.Popen[str]], server: str) -> None:
    ns, proc = desktop
    seen = markers_until(proc, "websockify")
    assert tuple(seen) == DESKTOPS[server]
    x_server = "xvnc" if server == "xvnc" else "xvfb"  # Xvnc is the X server too
    assert seen[x_server]["state"] == "ready" and seen[x_server]["display"] == ":87"
    assert seen[server]["state"] == "ready" and seen[server]["port"] == "5987"
    assert seen["websockify"]["state"] == "ready" and seen["websockify"]["port"] == "6080"
    assert asyncio.run(banner_through_websockify(ns)) == "RFB 003.008"


def test_a_part_that_dies_is_reported_and_the_supervisor_exits_non_zero(
        desktop: tuple[str, subprocess.Popen[str]], server: str) -> None:
    _, proc = desktop
    seen = markers_until(proc, "websockify")
    subprocess.run(["kill", "-KILL", seen[server]["pid"]], check=True)
    assert proc.stdout is not None
    exited = next(m for m in map(parse_marker, proc.stdout) if m and m[1].get("state") == "exited")
    assert exited[1]["service"] == server and exited[1]["code"] == "-9"
    assert proc.wait(timeout=30) == 1


def _control(path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(90)  # over the desktop's own deadline for stopping Chromium (60 s)
        conn.connect(str(path))
        conn.sendall(command.encode() + b"\n")
        return conn.makefile("rb").readline().decode().strip()


def test_the_browser_alone_is_stopped_and_started_again_on_request(namespaces: Namespaces, tmp_path: Path) -> None:
    """The profile keeper's way in: Chromium held down does not end the desktop; started again it is watched
    again, and an exit of its own then ends the desktop. (A stand-in `chromium` that says what Chromium says
    once it listens: root cannot run the real one sandboxed; the guest test runs the real one.)"""
    ns = namespaces.create("deskctl")
    run("ip", "link", "set", "lo", "up", netns=ns)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text("#!/bin/sh\necho 'DevTools listening on ws://127.0.0.1:9222/x' >&2\n"
                                      "exec sleep 600\n")
    (bin_dir / "chromium").chmod(0o755)
    control = tmp_path / "control"
    config = tmp_path / "desktop.json"
    config.write_text(json.dumps({"services": ["xvnc", "openbox", "chromium"], "display": ":88", "vnc_port": 5988,
                                  "control_socket": str(control)}))
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "browservm.guest.desktop",
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        first = markers_until(proc, "chromium")["chromium"]
        assert first["state"] == "ready"
        assert next(m for m in map(parse_marker, proc.stdout or []) if m)[1]["service"] == "desktop"
        assert control.stat().st_mode & 0o077 == 0  # its user (and root) only
        assert _control(control, "stop-browser") == "ok stopped"
        assert not Path(f"/proc/{first['pid']}").exists()
        assert proc.poll() is None  # the desktop lives on without its browser
        assert _control(control, "start-browser") == "ok ready"
        again = next(m for m in map(parse_marker, proc.stdout or []) if m and m[1].get("state") == "ready")[1]
        assert again["service"] == "chromium" and again["pid"] != first["pid"]
        assert _control(control, "reboot") == "failed unknown command 'reboot'"
        subprocess.run(["kill", "-KILL", again["pid"]], check=True)  # its own exit, not asked for
        exited = next(m for m in map(parse_marker, proc.stdout or []) if m and m[1].get("state") == "exited")
        assert exited[1]["service"] == "chromium"
        assert proc.wait(timeout=30) == 1
    finally:
        _stop(proc)


_SIGNED_IN = "browservm_test_signed_in"


class _SignIn(BaseHTTPRequestHandler):
    """A page that signs the browser in, as a provider does: a cookie kept for 30 days. Like a page with a
    form half filled in, it asks "leave site?" before it is left, once the person has used it."""
    visited = threading.Event()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Set-Cookie", f"{_SIGNED_IN}=yes; Max-Age=2592000; Path=/; HttpOnly")
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<html><body>signed in <input autofocus><script>addEventListener('beforeunload', "
                         b"e => { e.preventDefault(); e.returnValue = ''; });</script></body></html>")
        type(self).visited.set()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="needs Debian's chromium (scripts/install.sh)")
def test_a_sign_in_moments_before_the_browser_is_stopped_is_in_its_profile(
        namespaces: Namespaces, tmp_path: Path) -> None:
    """The profile keeper saves what Chromium wrote once stopped: a cookie set a moment before the stop (it
    commits its cookie store every 30 s) must be on disk by then, and a page asking "leave site?" must not
    hold the stop. The real Chromium (without its sandbox: root cannot run it sandboxed), signed in by a
    page in the namespace that the person has clicked into, then stopped at once."""
    ns = namespaces.create("deskcookie")
    run("ip", "link", "set", "lo", "up", netns=ns)
    with NetworkNamespace(ns).entered():
        listener = socket.create_server(("127.0.0.1", 0))
    page = ThreadingHTTPServer(listener.getsockname(), _SignIn, bind_and_activate=False)
    page.socket = listener
    threading.Thread(target=page.serve_forever, daemon=True).start()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "chromium").write_text('#!/bin/sh\nexec /usr/bin/chromium --no-sandbox "$@"\n')
    (bin_dir / "chromium").chmod(0o755)
    home, control, config = tmp_path / "home", tmp_path / "control", tmp_path / "desktop.json"
    config.write_text(json.dumps({"services": ["xvnc", "openbox", "chromium"], "display": ":89", "vnc_port": 5989,
                                  "devtools_port": 9289, "control_socket": str(control),
                                  "start_url": f"http://127.0.0.1:{listener.getsockname()[1]}/"}))
    proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "browservm.guest.desktop",
                             "--config", str(config)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True,
                            env={**os.environ, "HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    try:
        assert markers_until(proc, "chromium")["chromium"]["state"] == "ready"
        assert _SignIn.visited.wait(120), "Chromium never opened the sign-in page"
        with NetworkNamespace(ns).entered():
            _click_into_the_page("127.0.0.1:9289")
        assert _control(control, "stop-browser") == "ok stopped"
        stopped = next(m for m in map(parse_marker, proc.stdout or []) if m and m[1].get("state") == "stopped")[1]
        assert "killed" not in stopped and stopped["pages_closed"] == "1", stopped  # it ended by itself
        cookies = home / ".config" / "chromium" / "Default" / "Cookies"
        with contextlib.closing(sqlite3.connect(f"file:{cookies}?mode=ro", uri=True)) as db:
            names = [name for (name,) in db.execute("SELECT name FROM cookies")]
        assert _SIGNED_IN in names
    finally:
        _stop(proc)
        page.shutdown()
        page.server_close()


def _click_into_the_page(devtools: str) -> None:
    """A person's click and typing in Chromium's page, through DevTools: what lets a page ask before it is left."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(f"http://{devtools}/json/list", timeout=30) as answer:
        page = next(t for t in json.load(answer) if t["type"] == "page")
    with websockets.sync.client.connect(page["webSocketDebuggerUrl"], max_size=None, open_timeout=30) as cdp:
        calls = [("Input.dispatchMouseEvent", {"type": kind, "x": 20, "y": 20, "button": "left", "clickCount": 1})
                 for kind in ("mousePressed", "mouseReleased")] + [("Input.insertText", {"text": "half filled"})]
        for number, (method, params) in enumerate(calls):
            cdp.send(json.dumps({"id": number, "method": method, "params": params}))
            answer = json.loads(cdp.recv(timeout=30))
            assert "error" not in answer, answer
