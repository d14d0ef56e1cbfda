"""Probes from the host to a VM, one per hop, shared by the manager, the doctor and the tests.

    guest network  the guest says its network is configured: our configurator's marker, or the
                   kernel's `IP-Config: Complete` line; the kernel's `Unknown kernel command line
                   parameters "... ip=..."` line is evidence that it ignored ip=
    arp            the VM answers ARP for its address on its bridge, with its own MAC
    tcp            :6080 accepts a connection
    websocket      the upgrade request is answered with 101 (wsprobe.py)
    rfb            the VNC server's banner comes through the WebSocket (wsprobe.py)

Sockets are opened inside the VM network's namespace and keep it, so the
probes work from a controller that itself runs outside that namespace.
"""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address

from browservm.errors import ProbeFailed
from browservm.hostnet.netns import NetworkNamespace
from browservm.markers import parse_marker
from browservm.vm.console import ConsoleLog
from browservm.vm.wsprobe import rfb_banner, websocket_upgrade

_ETH_P_ARP = 0x0806
_SIOCGIFHWADDR = 0x8927
_ARP_RESEND_S = 0.2
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
    ignored = next((line for line in console.lines if IP_IGNORED in line and "ip=" in line), None)
    reasons = [verdict] if isinstance(verdict, str) else [f"no network line on the console within {timeout:g} s"]
    if ignored is not None:
        reasons.append("the kernel ignored ip= (it was built without CONFIG_IP_PNP): " + ignored.strip())
    raise ProbeFailed("guest network", "; ".join(reasons))


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
                    frame = await asyncio.wait_for(loop.sock_recv(sock, 2048), remaining)
                except TimeoutError:
                    break
                mac = _arp_reply_from(frame, target_ip)
                if mac is not None:
                    return mac
    except OSError as exc:
        raise ProbeFailed("arp", f"cannot send ARP on {bridge}: {exc.strerror}") from exc
    finally:
        sock.close()
    raise ProbeFailed("arp", f"no ARP reply from {target_ip} on {bridge} within {timeout:g} s: the guest's "
                             "interface is down or has no address")


async def open_tcp(netns: NetworkNamespace, address: IPv4Address, port: int,
                   timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One TCP connection to the VM, made from inside its network namespace."""
    with netns.entered():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (str(address), port)), timeout)
    except TimeoutError:
        sock.close()
        raise ProbeFailed("tcp", f"no answer from {address}:{port} within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise ProbeFailed("tcp", f"{address}:{port}: {exc.strerror}") from None
    return await asyncio.open_connection(sock=sock)


async def desktop_banner(netns: NetworkNamespace, address: IPv4Address, port: int, timeout: float) -> str:
    """tcp -> websocket -> rfb, each failure naming its hop; the RFB banner on success."""
    reader, writer = await open_tcp(netns, address, port, timeout)
    try:
        try:
            await asyncio.wait_for(websocket_upgrade(reader, writer, f"{address}:{port}"), timeout)
        except TimeoutError:
            raise ProbeFailed("websocket", f"no upgrade response within {timeout:g} s") from None
        try:
            return await asyncio.wait_for(rfb_banner(reader), timeout)
        except TimeoutError:
            raise ProbeFailed("rfb", f"no RFB banner within {timeout:g} s") from None
    finally:
        writer.close()
