"""browservm-desktop: starts the guest's desktop in order and says when each part is ready.

    Xvnc :1 (X server and VNC server on :5901) -> Openbox -> websockify :6080 (serving noVNC) -> Chromium
    Xvfb -> Openbox -> x11vnc :5901 -> websockify :6080 -> ...    (the minimal image's)

Xvnc (TigerVNC) is both the X server and the VNC server: a viewer may resize the screen
(SetDesktopSize; the proxy bounds the size, Xvnc has no bound of its own) and the clipboard
travels in UTF-8 (the Extended Clipboard), synced with the X CLIPBOARD and PRIMARY by Xvnc
itself. x11vnc can do neither; the minimal image keeps it.

The VNC server asks for the VM's own VNC password, which the host put on the config disk: only
the controller's proxy knows it, so no other local user of the host can open this desktop. With
that password it listens on every address of the guest: the controller's proxy speaks RFB to it
straight (the rfb path, vm/desktop_path.py); websockify stays for the seed's path. Without a
password (a desktop run outside a VM, as in tests) it listens on localhost only. Before
the desktop starts, systemd runs `browservm-desktop --install-vnc-password FILE --owner USER` as
root (the config disk is root's) into a directory only USER reads, in the format of the image's
VNC server (password_file_bytes). Both reread that file for each new client (x11vnc with
`-passwdfile read:`, Xvnc always), so a VM restored from a snapshot takes its own password
(guest/identity.py rewrites the file) without a restart.

Each part's readiness is read from the part itself, never guessed with a
timer: Xvfb and Xvnc write their display number to `-displayfd` once they accept
clients (Xvnc listens for RFB before that); x11vnc prints `PORT=` once it listens; websockify is handed a socket
that already listens (`--inetd`), so a connection made at any moment is
queued, not refused; Chromium prints `DevTools listening on` once it runs.
Openbox has no such signal and is reported as started. After each, one
marker on the console, and one more once every part is up:

    browservm-ready: service=xvnc state=ready port=5901 display=:1 pid=412 t=1.21
    browservm-ready: service=desktop state=ready services=xvnc,openbox,websockify,chromium t=50.60

If a part fails to start or exits later, the marker says so and this program
exits non-zero, so systemd restarts the whole desktop. Stdlib-only.

Chromium alone may be stopped and started again, for the browser profile keeper
(guest/profile_keeper.py, root) to put a person's profile in place or take it away: once the desktop
is ready it answers on a Unix socket only its user and root reach (CONTROL_SOCKET, in the desktop's
runtime directory, mode 0700), one line each way:

    stop-browser   -> "ok stopped"   Chromium ended in order (its pages closed through DevTools, then
                                     SIGINT), so it wrote its cookies out; kept down. Killed if it has
                                     not ended within a minute (the marker says so)
    start-browser  -> "ok ready"     Chromium started again and listening, or "failed <reason>"

While it is held down its exit does not end the desktop; an exit of its own does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from browservm.guest import configdisk
from browservm.guest.markers import format_marker

DEFAULT_CONFIG = Path("/etc/browservm/desktop.json")
CONTROL_SOCKET = Path("/run/browservm-desktop/control")
BROWSER_PROFILE = Path(".config") / "chromium"  # Chromium's user data directory, under the desktop user's home
_START_DEADLINE_S = 120.0  # generous: under software emulation Python alone takes seconds to start
_STOP_DEADLINE_S = 10.0
_DEPENDENTS_GRACE_S = 1.0  # how long after one part's exit the parts that depended on it are awaited
# Chromium stopped for its profile: killed, it would not write out what it keeps in memory (the newest
# cookies among it), so it is given longer, under software emulation.
_BROWSER_STOP_DEADLINE_S = 60.0
# Chromium on Linux takes SIGTERM for the session ending: it exits at once, writing its preferences but
# not its cookie store, which it commits every 30 s, so a sign-in of the last half minute would be lost.
# SIGINT is its orderly exit (windows closed, profile torn down), which writes everything out.
_BROWSER_STOP_SIGNAL = signal.SIGINT
_DEVTOOLS_TIMEOUT_S = 10.0
# The clipboard a viewer may paste into Xvnc: what the proxy lets through (rfb.MAX_CUT_TEXT), not
# Xvnc's 256 KiB, which drops a larger paste without a word.
MAX_CUT_TEXT = 1 << 20


@dataclass(frozen=True)
class DesktopConfig:
    services: tuple[str, ...] = ("xvnc", "openbox", "websockify", "chromium")
    display: str = ":1"
    geometry: str = "1280x800x24"
    vnc_port: int = 5901
    web_port: int = 6080
    novnc_dir: str = "/usr/share/novnc"
    start_url: str = "about:blank"
    devtools_port: int = 9222
    vnc_password_file: str | None = None  # None: no password (a desktop run outside a VM, as in tests)
    control_socket: str | None = None  # None: no control socket (the image's config names CONTROL_SOCKET)

    @classmethod
    def load(cls, path: Path) -> DesktopConfig:
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        if "services" in data:
            data["services"] = tuple(data["services"])
        return cls(**data)


class StartFailed(Exception):
    pass


def close_pages(devtools: str) -> int:
    """Close every page of the Chromium whose DevTools HTTP endpoint is `devtools` (host:port); how many.
    Unlike a window's close this runs no page's beforeunload handler (only its unload handler)."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
    with direct.open(f"http://{devtools}/json/list", timeout=_DEVTOOLS_TIMEOUT_S) as answer:
        targets = json.loads(answer.read(1 << 20))
    pages = [target["id"] for target in targets if isinstance(target, dict) and target.get("type") == "page"
             and isinstance(target.get("id"), str)]
    for page in pages:
        with direct.open(f"http://{devtools}/json/close/{quote(page, safe='')}", timeout=_DEVTOOLS_TIMEOUT_S) as answer:
            answer.read(4096)
    return len(pages)


class Desktop:
    def __init__(self, config: DesktopConfig) -> None:
        self.config = config
        self.children: dict[str, asyncio.subprocess.Process] = {}
        self._began = time.monotonic()
        self._env = {**os.environ, "DISPLAY": config.display}
        self._browser_held = False  # Chromium stopped on request: its exit is not the desktop's end
        self._children_changed = asyncio.Event()
        self._control_lock = asyncio.Lock()

    def _marker(self, service: str, state: str, **fields: object) -> None:
        print(format_marker("ready", service=service, state=state, **fields,
                            t=f"{time.monotonic() - self._began:.2f}"), flush=True)

    async def _spawn(self, service: str, *argv: str, stdout: int | None = None,
                     stderr: int | None = None, pass_fds: Sequence[int] = (), stdin: int | None = None,
                     ) -> asyncio.subprocess.Process:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=self._env, stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=stdout if stdout is not None else sys.stderr.fileno(),
                stderr=stderr if stderr is not None else sys.stderr.fileno(), pass_fds=tuple(pass_fds))
        except FileNotFoundError:
            raise StartFailed(f"{argv[0]} is not installed in the image") from None
        self.children[service] = proc
        return proc

    async def _await_line(self, service: str, stream: asyncio.StreamReader, needle: str) -> str:
        """Read `stream` until a line containing `needle`; the process's output keeps flowing to stderr."""
        while True:
            raw = await stream.readline()
            if not raw:
                raise StartFailed(f"{service} exited before it was ready")
            line = raw.decode(errors="replace")
            sys.stderr.write(f"{service}: {line}")
            if needle in line:
                asyncio.get_running_loop().create_task(self._drain(service, stream))
                return line

    @staticmethod
    async def _drain(service: str, stream: asyncio.StreamReader) -> None:
        async for raw in stream:
            sys.stderr.write(f"{service}: {raw.decode(errors='replace')}")

    async def _x_server(self, service: str, *argv: str) -> tuple[asyncio.subprocess.Process, str]:
        """Start an X server given `-displayfd`; once it accepts clients, it and its display (":1")."""
        read_end, write_end = os.pipe()
        try:
            proc = await self._spawn(service, *argv, "-nolisten", "tcp", "-displayfd", str(write_end),
                                     pass_fds=[write_end])
        finally:
            os.close(write_end)
        reader = asyncio.StreamReader()
        transport, _ = await asyncio.get_running_loop().connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_end, "rb"))
        try:
            number = (await reader.readline()).decode().strip()
        finally:
            transport.close()
        if not number:
            raise StartFailed(f"{argv[0]} exited before it accepted clients")
        return proc, f":{number}"

    async def xvfb(self) -> None:
        proc, display = await self._x_server("xvfb", "Xvfb", self.config.display, "-screen", "0",
                                             self.config.geometry)
        self._marker("xvfb", "ready", display=display, pid=proc.pid)

    async def xvnc(self) -> None:
        password = self.config.vnc_password_file
        if password is None:
            auth = ["-SecurityTypes", "None", "-localhost"]
        elif os.path.exists(password):
            # VncAuth only: the proxy speaks it (rfb.py), and TLS inside the VM network buys nothing.
            # No blacklist: every client comes from the controller's one address, and a few failed
            # attempts (a stale password) would shut the controller out of its own VM.
            auth = ["-SecurityTypes", "VncAuth", "-PasswordFile", password, "-UseBlacklist=0"]
        else:  # fail closed: a desktop without its password would be open to every local user of the host
            raise StartFailed(f"no VNC password at {password} (browservm-desktop --install-vnc-password did not run)")
        width, height, depth = self.config.geometry.split("x")
        proc, display = await self._x_server(
            "xvnc", "Xvnc", self.config.display, "-geometry", f"{width}x{height}", "-depth", depth,
            "-rfbport", str(self.config.vnc_port), "-AlwaysShared", "-MaxCutText", str(MAX_CUT_TEXT),
            "-desktop", "browservm", *auth)
        self._marker("xvnc", "ready", port=self.config.vnc_port, display=display, pid=proc.pid)

    async def openbox(self) -> None:
        proc = await self._spawn("openbox", "openbox")
        self._marker("openbox", "started", pid=proc.pid)

    async def x11vnc(self) -> None:
        password = self.config.vnc_password_file
        if password is None:
            auth = ["-nopw", "-localhost"]
        elif os.path.exists(password):
            auth = ["-passwdfile", f"read:{password}"]
        else:  # fail closed: a desktop without its password would be open to every local user of the host
            raise StartFailed(f"no VNC password at {password} (browservm-desktop --install-vnc-password did not run)")
        # -nonap: idle, x11vnc otherwise takes naps of up to seconds between looking at its clients,
        # and a viewer of a VM that has waited in the warm pool got its first frame 1-10 s late.
        proc = await self._spawn("x11vnc", "x11vnc", "-display", self.config.display,
                                 "-rfbport", str(self.config.vnc_port), "-forever", "-shared", "-nonap", *auth,
                                 stdout=asyncio.subprocess.PIPE)
        assert proc.stdout is not None
        await self._await_line("x11vnc", proc.stdout, "PORT=")
        self._marker("x11vnc", "ready", port=self.config.vnc_port, pid=proc.pid)

    async def websockify(self) -> None:
        listener = socket.create_server(("0.0.0.0", self.config.web_port), backlog=64)  # noqa: S104 - the VM's :6080
        try:
            proc = await self._spawn("websockify", "websockify", "--inetd", "--web", self.config.novnc_dir,
                                     f"127.0.0.1:{self.config.vnc_port}", stdin=listener.fileno())
        finally:
            listener.close()  # websockify holds its own copy
        self._marker("websockify", "ready", port=self.config.web_port, pid=proc.pid)

    async def chromium(self) -> None:
        width, height, _ = self.config.geometry.split("x")
        profile = Path.home() / BROWSER_PROFILE
        proc = await self._spawn(
            "chromium", "chromium", "--no-first-run", "--no-default-browser-check",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--remote-debugging-port={self.config.devtools_port}", f"--user-data-dir={profile}",
            "--window-position=0,0", f"--window-size={width},{height}", "--start-maximized",
            self.config.start_url, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        await self._await_line("chromium", proc.stderr, "DevTools listening on")
        self._marker("chromium", "ready", devtools=self.config.devtools_port, pid=proc.pid)

    async def run(self) -> int:
        steps = {"xvnc": self.xvnc, "xvfb": self.xvfb, "openbox": self.openbox, "x11vnc": self.x11vnc,
                 "websockify": self.websockify, "chromium": self.chromium}
        for service in self.config.services:
            try:
                async with asyncio.timeout(_START_DEADLINE_S):
                    await steps[service]()
            except (StartFailed, TimeoutError, OSError) as exc:
                reason = str(exc) or f"not ready within {_START_DEADLINE_S:g} s"
                self._marker(service, "failed", reason=reason)
                await self.stop()
                return 1
        control = await self._serve_control()
        # What a person opening the viewer now sees is the whole desktop, its last part included.
        self._marker("desktop", "ready", services=",".join(self.config.services))
        try:
            await self._supervise()
        finally:
            if control is not None:
                control.close()
        await self.stop()
        return 1

    async def _supervise(self) -> None:
        """Return once a part exits that was not held down on request."""
        while True:
            self._children_changed.clear()
            waits = {asyncio.ensure_future(proc.wait()): name for name, proc in self.children.items()
                     if not (name == "chromium" and self._browser_held)}
            changed = asyncio.ensure_future(self._children_changed.wait())
            done, _ = await asyncio.wait([*waits, changed], return_when=asyncio.FIRST_COMPLETED)
            for pending in (*waits, changed):
                pending.cancel()
            ended = [(waits[future], future.result()) for future in done if future in waits]
            ended = [(name, code) for name, code in ended if not (name == "chromium" and self._browser_held)]
            if ended:
                await self._report_ended(ended)
                return

    async def _report_ended(self, ended: list[tuple[str, int]]) -> None:
        """Mark every part that ended, the cause first. A part that loses the X server (or the VNC server)
        ends a moment after it, and which exit the event loop hears of first is chance: so the parts that
        end within _DEPENDENTS_GRACE_S are reported in start order, where a part only depends on earlier ones."""
        waits = {asyncio.ensure_future(self.children[name].wait()): name for name in self.children
                 if name not in dict(ended) and not (name == "chromium" and self._browser_held)}
        if waits:
            done, pending = await asyncio.wait(waits, timeout=_DEPENDENTS_GRACE_S)
            for future in pending:
                future.cancel()
            ended += [(waits[future], future.result()) for future in done]
        order = {name: i for i, name in enumerate(self.config.services)}
        for name, code in sorted(ended, key=lambda item: order.get(item[0], len(order))):
            self._marker(name, "exited", code=code)

    async def _serve_control(self) -> asyncio.AbstractServer | None:
        path = self.config.control_socket
        if path is None or "chromium" not in self.config.services:
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o077)  # the socket itself: its owner and root only
        try:
            return await asyncio.start_unix_server(self._control, path=path)
        finally:
            os.umask(old)

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline())[:64].decode(errors="replace").strip()
            async with self._control_lock:
                if line == "stop-browser":
                    answer = await self._stop_browser()
                elif line == "start-browser":
                    answer = await self._start_browser()
                else:
                    answer = f"failed unknown command {line[:32]!r}"
            writer.write(answer.encode() + b"\n")
            await writer.drain()
        except (ConnectionError, OSError):
            pass  # the asker left: it learns nothing more
        finally:
            writer.close()

    async def _stop_browser(self) -> str:
        self._browser_held = True
        self._children_changed.set()
        proc = self.children.get("chromium")
        said: dict[str, object] = {}
        if proc is not None and proc.returncode is None:
            # Its pages first: a page with a "leave site?" question would hold the orderly exit until the
            # deadline. Closed through DevTools they ask nothing; the last one closed ends Chromium.
            try:
                said["pages_closed"] = await asyncio.to_thread(close_pages, f"127.0.0.1:{self.config.devtools_port}")
            except (OSError, ValueError) as exc:
                said["pages_closed"] = f"none ({exc})"  # SIGINT alone, then
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(_BROWSER_STOP_SIGNAL)
            try:
                await asyncio.wait_for(proc.wait(), _BROWSER_STOP_DEADLINE_S)
            except TimeoutError:  # what it kept in memory is lost
                proc.kill()
                await proc.wait()
                said["killed"] = f"not ended within {_BROWSER_STOP_DEADLINE_S:g} s"
        self._marker("chromium", "stopped", **said)
        return "ok stopped"

    async def _start_browser(self) -> str:
        if not self._browser_held:
            return "ok ready"  # it runs: nothing to do
        try:
            async with asyncio.timeout(_START_DEADLINE_S):
                await self.chromium()
        except (StartFailed, TimeoutError, OSError) as exc:
            reason = str(exc) or f"not ready within {_START_DEADLINE_S:g} s"
            self._marker("chromium", "failed", reason=reason)
            return f"failed {reason}"
        self._browser_held = False
        self._children_changed.set()
        return "ok ready"

    async def stop(self) -> None:
        """Terminate every part, newest first; kill what is still there after the deadline."""
        for proc in reversed(self.children.values()):
            if proc.returncode is None:
                proc.terminate()
        waits = [asyncio.ensure_future(proc.wait()) for proc in self.children.values()]
        if waits:
            _, late = await asyncio.wait(waits, timeout=_STOP_DEADLINE_S)
            for proc in self.children.values():
                if proc.returncode is None:
                    proc.kill()
            await asyncio.gather(*late)


async def _run_until_signalled(desktop: Desktop) -> int:
    """Run the desktop; on SIGTERM or SIGINT stop every part before exiting, leaving no orphans."""
    loop = asyncio.get_running_loop()
    running = asyncio.ensure_future(desktop.run())
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, running.cancel)
    try:
        return await running
    except asyncio.CancelledError:
        await desktop.stop()
        return 0


def password_file_bytes(secrets: Mapping[str, object], services: Sequence[str]) -> bytes:
    """The password file of the VNC server among `services`, from the config disk's `secrets`:
    for Xvnc vncpasswd's format (`vnc_file`, made by the host), for x11vnc the password itself."""
    password = secrets.get("vnc")
    if not isinstance(password, str) or not password.isalnum() or not 6 <= len(password) <= 8:
        raise configdisk.ConfigDiskError("the config disk carries no VNC password (secrets.vnc, 6-8 letters or digits)")
    if "xvnc" not in services:
        return password.encode() + b"\n"
    encrypted = secrets.get("vnc_file")
    try:
        content = bytes.fromhex(encrypted) if isinstance(encrypted, str) else b""
    except ValueError:
        content = b""
    if len(content) != 8:
        raise configdisk.ConfigDiskError("the config disk carries no VNC password file for Xvnc (secrets.vnc_file, "
                                         "16 hex digits)")
    return content


def install_vnc_password(target: Path, owner: str, services: Sequence[str],
                         disk: Path = configdisk.GUEST_DEVICE) -> None:
    """Write the config disk's VNC password to `target` as `services`' VNC server reads it, for `owner` only."""
    write_vnc_password(target, password_file_bytes(configdisk.read(disk).get("secrets", {}), services), owner)


def write_vnc_password(target: Path, content: bytes, owner: str) -> None:
    """`target` holds `content`, readable by `owner` only; replaced whole (the VNC server may read it any time)."""
    account = pwd.getpwnam(owner)
    staged = target.with_name(target.name + ".new")
    fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchown(fd, account.pw_uid, account.pw_gid)
        os.write(fd, content)
    finally:
        os.close(fd)
    os.replace(staged, target)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-desktop", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--install-vnc-password", type=Path, metavar="FILE",
                        help="(as root, before the desktop starts) write the config disk's VNC password to FILE")
    parser.add_argument("--owner", default="browser", help="the account FILE is for")
    parser.add_argument("--config-disk", type=Path, default=configdisk.GUEST_DEVICE)
    args = parser.parse_args(argv)
    if args.install_vnc_password is not None:
        try:
            install_vnc_password(args.install_vnc_password, args.owner, DesktopConfig.load(args.config).services,
                                 args.config_disk)
        except (OSError, KeyError, ValueError, TypeError, configdisk.ConfigDiskError) as exc:
            print(format_marker("ready", service="desktop", state="failed", reason=f"VNC password: {exc}"),
                  flush=True)
            return 1
        return 0
    return asyncio.run(_run_until_signalled(Desktop(DesktopConfig.load(args.config))))


if __name__ == "__main__":
    sys.exit(main())
