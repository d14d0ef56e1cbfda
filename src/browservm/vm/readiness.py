"""Probes from the host to a VM, one per readiness hop (names from hops.py), shared by the
manager, the doctor and the tests.

    guest.network  the guest says its network is configured: our configurator's marker, or the
                   kernel's `IP-Config: Complete` line; the kernel's `Unknown kernel command line
                   parameters "... ip=..."` line is evidence that it ignored ip=
    net.arp        the VM answers ARP for its address on its bridge, with its own MAC
    desktop.ready  the guest's desktop supervisor reports the path's listener up (Xvnc or x11vnc, or websockify)
    net.tcp        the path's port (:5901, or :6080) accepts a connection
    ws.upgrade     (websockify path only) the upgrade is answered with 101
    rfb.banner     the VNC server's banner comes through, announcing one of rfb.SERVER_VERSIONS
                   (these three: DesktopConnection, for readiness, the doctor and the proxy alike)
    desktop.complete  the desktop supervisor reports every part up: the browser on screen

Which path a VM's desktop is reached by is vm/desktop_path.py's.

Sockets are opened inside the VM network's namespace and keep it, so the
probes work from a controller that itself runs outside that namespace.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import struct
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Protocol

from browservm import rfb
from browservm.errors import HostNetworkError, ProbeFailed
from browservm.guest.markers import WHOLE_DESKTOP, parse_marker, parse_ready
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_link import Leg, LegSettings, TcpLeg, UpstreamEnded, WebSocketLeg
from browservm.vm.hops import (
    DESKTOP_COMPLETE,
    DESKTOP_READY,
    GUEST_NETWORK,
    IP_PNP_HINT,
    NET_ARP,
    NET_TCP,
    RFB_BANNER,
    VMM_EXITED,
    WS_UPGRADE,
)
from browservm.vm.screen import hang_up, wait_browser_on_screen
from browservm.vm.stall import reached_userspace
from browservm.vmm.process import VmmProcess, cpu_seconds

_ETH_P_ARP = 0x0806
_SIOCGIFHWADDR = 0x8927
_ARP_RESEND_S = 0.2
HANG_UP_S = 10.0  # x11vnc lets a viewer that left go at once; this bounds one that does not
IP_IGNORED = 'Unknown kernel command line parameters'


@dataclass(frozen=True)
class GuestNetwork:
    by: str  # "configurator" or "kernel"
    line: str


def guest_network_line(line: str) -> GuestNetwork | str | None:
    """What one console line says about the guest's network: configured, failed (a reason), or nothing."""
    marker = parse_marker(line)
    if marker is not None and marker[0] == "net":
        fields = marker[1]
        if fields.get("status") == "ok":
            return GuestNetwork(fields.get("by", "configurator"), line)
        if fields.get("status") in ("failed", "disabled", "skipped"):
            return f"the guest's network configurator reported {fields.get('status')}: {fields.get('reason', '')}"
    if "IP-Config: Complete" in line:
        return GuestNetwork("kernel", line)
    return None


async def wait_guest_network(console: ConsoleLog, timeout: float) -> GuestNetwork:
    """Wait for the guest to say its network is up; ProbeFailed("guest network") with the evidence if not."""
    found = await console.wait_for(lambda line: guest_network_line(line) is not None, timeout)
    verdict = guest_network_line(found) if found is not None else None
    if isinstance(verdict, GuestNetwork):
        return verdict
    lines = list(console.lines)
    ignored = next((line for line in lines if IP_IGNORED in line and "ip=" in line), None)
    reasons = [verdict] if isinstance(verdict, str) else [_silence(console.path, lines, timeout)]
    if ignored is not None:
        reasons.append("the kernel ignored ip= (it was built without CONFIG_IP_PNP): " + ignored.strip())
    # The IP_PNP hint only with its evidence: a console that stopped early says nothing about ip=.
    raise ProbeFailed(GUEST_NETWORK, "; ".join(reasons), IP_PNP_HINT if ignored is not None else None)


def _silence(path: Path, lines: list[str], timeout: float) -> str:
    """What a console without a network line shows: nothing at all, a kernel that stopped before
    userspace (when, and its last line), or a userspace that never configured the network."""
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]
    if not last:
        return f"the console stayed empty for {timeout:g} s: the guest kernel never printed (the VMM's log says why)"
    try:
        ago = f", {time.time() - path.stat().st_mtime:.0f} s before the deadline"
    except OSError:
        ago = ""
    if not reached_userspace(lines):
        return f"the console stopped before userspace: the kernel's last line was {last!r}{ago}"
    return f"no network line on the console within {timeout:g} s (userspace started; its last line: {last!r})"


def _hardware_address(sock: socket.socket, interface: str) -> bytes:
    request = struct.pack("256s", interface.encode()[:15])
    return fcntl.ioctl(sock.fileno(), _SIOCGIFHWADDR, request)[18:24]


def _arp_request(source_mac: bytes, source_ip: IPv4Address, target_ip: IPv4Address) -> bytes:
    ethernet = b"\xff" * 6 + source_mac + struct.pack("!H", _ETH_P_ARP)
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, source_mac, source_ip.packed, b"\0" * 6,
                      target_ip.packed)
    return ethernet + arp


def _arp_reply_from(frame: bytes, target_ip: IPv4Address) -> str | None:
    if len(frame) < 42 or frame[12:14] != struct.pack("!H", _ETH_P_ARP):
        return None
    opcode, sender_mac, sender_ip = struct.unpack("!H6s4s", frame[20:32])
    if opcode != 2 or sender_ip != target_ip.packed:
        return None
    return ":".join(f"{b:02x}" for b in sender_mac)


async def arp_probe(netns: NetworkNamespace, bridge: str, source_ip: IPv4Address, target_ip: IPv4Address,
                    timeout: float) -> str:
    """Ask on `bridge` who has `target_ip`, resending every 0.2 s; the MAC that answers."""
    with netns.entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ARP))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        sock.bind((bridge, _ETH_P_ARP))
        sock.setblocking(False)
        request = _arp_request(_hardware_address(sock, bridge), source_ip, target_ip)
        while loop.time() < deadline:
            await loop.sock_sendall(sock, request)
            resend_at = min(deadline, loop.time() + _ARP_RESEND_S)
            while (remaining := resend_at - loop.time()) > 0:
                try:
                    async with asyncio.timeout(remaining):
                        frame = await loop.sock_recv(sock, 2048)
                except TimeoutError:
                    break
                mac = _arp_reply_from(frame, target_ip)
                if mac is not None:
                    return mac
    except OSError as exc:
        raise ProbeFailed(NET_ARP, f"cannot send ARP on {bridge}: {exc.strerror}") from exc
    finally:
        sock.close()
    raise ProbeFailed(NET_ARP, f"no ARP reply from {target_ip} on {bridge} within {timeout:g} s: the guest's "
                             "interface is down or has no address")


async def _wait_desktop_marker(console: ConsoleLog, hop: str, services: tuple[str, ...], timeout: float) -> None:
    """Wait for the desktop supervisor's marker that one of `services` is ready (an image runs one of
    them); ProbeFailed naming the part that failed."""
    named = " or ".join(services)

    def ready_or_failure(line: str) -> bool:
        marker = parse_ready(line)
        return marker is not None and (marker.service in (*services, WHOLE_DESKTOP) or marker.stopped)

    line = await console.wait_for(ready_or_failure, timeout)
    if line is None:
        raise ProbeFailed(hop, f"{named} did not report ready within {timeout:g} s")
    marker = parse_ready(line)
    assert marker is not None
    if (marker.service == WHOLE_DESKTOP and WHOLE_DESKTOP not in services
            and not set(services) & set(marker.services)):
        # The whole desktop is up without this part: waiting longer cannot help.
        raise ProbeFailed(hop, f"the desktop reported ready without {named} (it started "
                               f"{', '.join(marker.services)}): the image's /etc/browservm/desktop.json leaves it out")
    if marker.state != "ready":
        raise ProbeFailed(hop, f"{marker.service} {marker.state}: {marker.why}")


async def wait_desktop_ready(console: ConsoleLog, timeout: float, listeners: tuple[str, ...]) -> None:
    """desktop.ready: the desktop supervisor reports one of `listeners` (the VNC server, or websockify) listening."""
    await _wait_desktop_marker(console, DESKTOP_READY, listeners, timeout)


SETTLE_WINDOW_S = 2.0
SETTLED_SHARE = 0.25  # of one CPU. Measured under emulation: an idle desktop 6-8 %, a busy one 100 %


async def wait_settled(vmm: VmmProcess, timeout: float) -> float:
    """Until the VM's VMM used less than SETTLED_SHARE of a CPU over SETTLE_WINDOW_S (the guest has
    done what it was doing); the share it used. TimeoutError naming the last share at the deadline;
    ProbeFailed(vmm.exited) if the VMM is gone. Sampled: nothing announces that a guest went idle."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    before = await asyncio.to_thread(cpu_seconds, vmm)
    while before is not None:
        await asyncio.sleep(SETTLE_WINDOW_S)
        after = await asyncio.to_thread(cpu_seconds, vmm)
        if after is None:
            break
        share = (after - before) / SETTLE_WINDOW_S
        if share < SETTLED_SHARE:
            return share
        if loop.time() >= deadline:
            raise TimeoutError(f"the VM still used {share:.0%} of a CPU after {timeout:g} s")
        before = after
    raise ProbeFailed(VMM_EXITED, f"the VMM (PID {vmm.pid}) is gone")


def desktop_services(lines: list[str]) -> tuple[str, ...]:
    """The parts the desktop supervisor said it started, from its last whole-desktop marker."""
    for line in reversed(lines):
        marker = parse_ready(line)
        if marker is not None and marker.service == WHOLE_DESKTOP:
            return marker.services
    return ()


async def wait_desktop_complete(console: ConsoleLog, timeout: float) -> None:
    """desktop.complete: the desktop supervisor reports every part up, the browser on screen."""
    await _wait_desktop_marker(console, DESKTOP_COMPLETE, (WHOLE_DESKTOP,), timeout)


async def connect_socket(netns: NetworkNamespace, address: IPv4Address, port: int, timeout: float) -> socket.socket:
    """A connected, non-blocking TCP socket to the VM, made inside its network namespace (net.tcp).

    The socket keeps that namespace, so this works from a controller running outside it.
    """
    try:
        with netns.entered():
            # IPPROTO_TCP named: asyncio then turns Nagle off on the transports made from it.
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except (HostNetworkError, OSError) as exc:
        raise ProbeFailed(NET_TCP, f"cannot open a socket towards {address}:{port}: {exc}") from None
    try:
        sock.setblocking(False)
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
    except TimeoutError:
        sock.close()
        raise ProbeFailed(NET_TCP, f"no answer from {address}:{port} within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        # asyncio's strerror reads "Connect call failed (...)": the errno's own words say more
        raise ProbeFailed(NET_TCP, f"{address}:{port}: {os.strerror(exc.errno) if exc.errno else exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock


async def open_tcp(netns: NetworkNamespace, address: IPv4Address, port: int,
                   timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One TCP connection to the VM as asyncio streams (net.tcp)."""
    return await asyncio.open_connection(sock=await connect_socket(netns, address, port, timeout))


# A probe's leg reads the 12-byte banner and hangs up: no keepalive, small messages.
PROBE = LegSettings(keepalive=None, close_timeout=5.0, max_message=64 * 1024, queue_limit=1)


class DesktopConnection:
    """The last hops on one connection to a VM's desktop: TCP (`open`), the WebSocket upgrade
    (`upgrade`, websockify's path only), the RFB banner (`banner`), on vm/desktop_link.py's legs.

    The one implementation of them: the manager and the doctor run the steps one by one (each its
    own hop with its own deadline), the proxy runs them and then authenticates on `reader`, and
    `desktop_banner` runs them in a row for everyone else.
    """

    def __init__(self, sock: socket.socket, url: str, *, websocket: bool, settings: LegSettings) -> None:
        self._sock = sock
        self._url = url
        self._settings = settings
        self.websocket = websocket
        self._leg: Leg | None = None
        self._reader: rfb.MessageReader | None = None
        self.version = b""  # the banner's line, once `banner` read it

    @classmethod
    async def open(cls, netns: NetworkNamespace, address: IPv4Address, port: int, timeout: float, *,
                   websocket: bool, ws_path: str = "/websockify", settings: LegSettings = PROBE) -> DesktopConnection:
        """net.tcp: connected from inside `netns` within `timeout`; RFB inside a WebSocket to `ws_path`
        (websockify) after `upgrade` when `websocket`, else RFB straight on TCP (x11vnc)."""
        sock = await connect_socket(netns, address, port, timeout)
        connection = cls(sock, f"ws://{address}:{port}{ws_path}", websocket=websocket, settings=settings)
        if not websocket:
            try:
                connection._started(await TcpLeg.open(sock, settings))
            except BaseException:
                sock.close()
                raise
        return connection

    def _started(self, leg: Leg) -> None:
        self._leg = leg
        self._reader = rfb.MessageReader(leg.recv)

    @property
    def leg(self) -> Leg:
        """The connection, past TCP (and the upgrade on websockify's path)."""
        if self._leg is None:
            raise RuntimeError("the desktop connection is not upgraded yet")
        return self._leg

    @property
    def reader(self) -> rfb.MessageReader:
        """Exact reads from the VM's side; after `banner`, what follows it."""
        if self._reader is None:
            raise RuntimeError("the desktop connection is not upgraded yet")
        return self._reader

    async def upgrade(self, timeout: float | None = None) -> None:
        """ws.upgrade: ProbeFailed unless answered with 101, within `timeout` when given (else the
        caller's deadline bounds it)."""
        if not self.websocket or self._leg is not None:
            raise RuntimeError("only a websockify connection is upgraded, and once")
        self._started(await WebSocketLeg.open(self._sock, self._url, self._settings, timeout))

    async def banner(self) -> str:
        """rfb.banner: the VNC server's version line, which must announce one of rfb.SERVER_VERSIONS."""
        try:
            self.version = await self.reader.read(len(rfb.VERSION))
            rfb.server_version(self.version)
        except UpstreamEnded as ended:
            raise ProbeFailed(RFB_BANNER, ended.early) from None
        except rfb.HandshakeFailed as exc:
            raise ProbeFailed(RFB_BANNER, str(exc)) from None
        return self.version.decode().strip()

    def close(self) -> None:
        if self._leg is not None:
            self._leg.abort()
        else:
            self._sock.close()


async def desktop_banner(netns: NetworkNamespace, address: IPv4Address, port: int, timeout: float, *,
                         websocket: bool) -> str:
    """net.tcp -> ws.upgrade (`websocket` only) -> rfb.banner, each with `timeout` and each failure
    naming its hop."""
    connection = await DesktopConnection.open(netns, address, port, timeout, websocket=websocket)
    steps = ((WS_UPGRADE, connection.upgrade),) if websocket else ()
    try:
        for hop, step in (*steps, (RFB_BANNER, connection.banner)):
            try:
                async with asyncio.timeout(timeout):
                    result = await step()
            except TimeoutError:
                raise ProbeFailed(hop, f"no answer within {timeout:g} s") from None
        assert isinstance(result, str)
        return result
    finally:
        connection.close()


class Connection(Protocol):
    async def upgrade(self) -> None: ...

    async def banner(self) -> str: ...

    def close(self) -> None: ...


class Probes(Protocol):
    """The readiness hops as the manager runs them (GuestProbes are the real ones)."""

    async def guest_network(self, console: ConsoleLog, timeout: float) -> GuestNetwork: ...

    async def arp(self, netns: NetworkNamespace, bridge: str, source: IPv4Address, target: IPv4Address,
                  timeout: float) -> str: ...

    async def desktop_ready(self, console: ConsoleLog, timeout: float, listeners: tuple[str, ...]) -> None: ...

    async def desktop_complete(self, console: ConsoleLog, timeout: float) -> None: ...

    async def connect(self, netns: NetworkNamespace, address: IPv4Address, port: int,
                      timeout: float, websocket: bool) -> Connection: ...

    async def browser_on_screen(self, netns: NetworkNamespace, address: IPv4Address, port: int, password: str,
                                timeout: float) -> None:
        """The browser painted on the VM's screen, judged by its pixels (vm/screen.py)."""
        ...

    async def settled(self, vmm: VmmProcess, timeout: float) -> float:
        """The VM idle (wait_settled)."""
        ...


class GuestProbes:
    """The real probes: the console, ARP on the bridge, and one DesktopConnection."""

    async def guest_network(self, console: ConsoleLog, timeout: float) -> GuestNetwork:
        return await wait_guest_network(console, timeout)

    async def arp(self, netns: NetworkNamespace, bridge: str, source: IPv4Address, target: IPv4Address,
                  timeout: float) -> str:
        return await arp_probe(netns, bridge, source, target, timeout)

    async def desktop_ready(self, console: ConsoleLog, timeout: float, listeners: tuple[str, ...]) -> None:
        await wait_desktop_ready(console, timeout, listeners)

    async def desktop_complete(self, console: ConsoleLog, timeout: float) -> None:
        await wait_desktop_complete(console, timeout)

    async def connect(self, netns: NetworkNamespace, address: IPv4Address, port: int,
                      timeout: float, websocket: bool) -> Connection:
        return await DesktopConnection.open(netns, address, port, timeout, websocket=websocket)

    async def browser_on_screen(self, netns: NetworkNamespace, address: IPv4Address, port: int, password: str,
                                timeout: float) -> None:
        reader, writer = await open_tcp(netns, address, port, timeout)
        try:
            await wait_browser_on_screen(reader, writer, password, timeout)
            await hang_up(reader, writer, min(timeout, HANG_UP_S))
        finally:
            writer.close()

    async def settled(self, vmm: VmmProcess, timeout: float) -> float:
        return await wait_settled(vmm, timeout)
