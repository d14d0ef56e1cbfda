"""The isolation rules, checked with real packets between real namespaces.

Stand-in guests (namespaces behind veth pairs, attached to the bridge exactly
as TAPs are, through `HostNetwork.attach_link`) try to reach each other, the
host's services, and the controller's guest-facing port. Controls switch each
mechanism off to show that the test's own set-up can carry the traffic being
blocked.

The helpers here serve the attack tests too (test_antispoof.py,
test_isolation_egress.py). Every test that sends packets runs twice: with
bridged IPv4/ARP passed to the inet and arp hooks (br_netfilter's
bridge-nf-call-* on) and without. This kernel has br_netfilter built in
(CONFIG_BRIDGE_NETFILTER=y, so it is always "loaded" and cannot be unloaded);
its switches are per network namespace, so each test sets them in its own
controller namespace, which is what loading or not loading the module changes.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from browservm.egress import EgressPolicy
from browservm.hostnet.firewall import Nftables
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

GATEWAY = "192.168.100.1"
GUEST_PORT = 8089
HOST_SERVICE_PORT = 9099
VNC_PORT = 6080
NOBODY = 65534
ETH_P_ALL, ETH_P_IP, ETH_P_ARP, ETH_P_IPV6 = 0x0003, 0x0800, 0x0806, 0x86DD


def can_connect(netns: str, address: str, port: int, timeout: float = 1.0) -> bool:
    with NetworkNamespace(netns).entered():
        try:
            socket.create_connection((address, port), timeout=timeout).close()
        except OSError:
            return False
    return True


@contextlib.contextmanager
def listening(netns: str, address: str, port: int) -> Iterator[None]:
    with NetworkNamespace(netns).entered():
        server = socket.create_server((address, port))
    try:
        yield
    finally:
        server.close()


def set_bridge_netfilter(netns: str, on: bool) -> None:
    """br_netfilter's switches, in this namespace only (they are per namespace)."""
    with NetworkNamespace(netns).entered():
        for key in ("iptables", "arptables", "ip6tables"):
            Path(f"/proc/sys/net/bridge/bridge-nf-call-{key}").write_text("1\n" if on else "0\n")


@pytest.fixture(params=[False, True], ids=["br_netfilter-off", "br_netfilter-on"], name="bridge_netfilter")
def bridge_netfilter_fixture(request: pytest.FixtureRequest) -> bool:
    on: bool = request.param
    return on


@dataclass
class Guest:
    netns: str
    lease: Lease

    @property
    def ip(self) -> str:
        return str(self.lease.address.ip)

    @property
    def mac(self) -> bytes:
        return bytes.fromhex(self.lease.mac.replace(":", ""))


@dataclass
class Lab:
    """A controller namespace with browservm's host network, and stand-in guests on it."""

    namespaces: Namespaces
    network: HostNetwork
    ipam: Ipam
    bridge_netfilter: bool
    guests: list[Guest] = field(default_factory=list)

    @property
    def ctl(self) -> str:
        assert self.network.netns.name is not None
        return self.network.netns.name

    def up(self) -> None:
        self.network.up()
        set_bridge_netfilter(self.ctl, self.bridge_netfilter)

    def guest(self, vm_id: str, egress: EgressPolicy | None = None) -> Guest:
        lease = self.ipam.lease(vm_id, egress)
        netns = self.namespaces.create(vm_id[-2:])
        run("ip", "link", "add", lease.tap, "type", "veth", "peer", "name", "eth0", "netns", netns, netns=self.ctl)
        run("ip", "link", "set", "eth0", "address", lease.mac, netns=netns)
        run("ip", "addr", "add", str(lease.address), "dev", "eth0", netns=netns)
        run("ip", "link", "set", "eth0", "up", netns=netns)
        run("ip", "link", "set", "lo", "up", netns=netns)
        run("ip", "route", "add", "default", "via", str(lease.gateway), netns=netns)
        self.network.attach_link(lease)
        guest = Guest(netns, lease)
        self.guests.append(guest)
        return guest

    def bridge_mac(self) -> bytes:
        link = json.loads(run("ip", "-j", "link", "show", "br0", netns=self.ctl).stdout)[0]
        return bytes.fromhex(str(link["address"]).replace(":", ""))

    def neighbour(self, address: str) -> str | None:
        entries = json.loads(run("ip", "-j", "neigh", "show", address, "dev", "br0", netns=self.ctl).stdout or "[]")
        return str(entries[0].get("lladdr")) if entries else None


@contextlib.contextmanager
def lab(namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool = False, **plan: object) -> Iterator[Lab]:
    ctl = namespaces.name()
    built = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", **plan)  # type: ignore[arg-type]
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(built, store, NetworkNamespace(ctl)) as network:
        try:
            yield Lab(namespaces, network, Ipam(store, built), bridge_netfilter)
        finally:
            network.down(force=True)


# --- frames, sent raw from inside a namespace, and seen raw ------------------------------------

def ethernet(dst: bytes, src: bytes, kind: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", kind) + payload


def arp(op: int, sender_mac: bytes, sender_ip: str, target_mac: bytes, target_ip: str) -> bytes:
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sender_mac, IPv4Address(sender_ip).packed,
                       target_mac, IPv4Address(target_ip).packed)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ipv4_udp(source: str, destination: str, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         IPv4Address(source).packed, IPv4Address(destination).packed)
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + udp


def router_advertisement(source_mac: bytes) -> bytes:
    """An ICMPv6 RA announcing itself as default router and a prefix, to all nodes."""
    source = bytes.fromhex("fe80000000000000") + source_mac[:3] + b"\xff\xfe" + source_mac[3:]
    destination = bytes.fromhex("ff020000000000000000000000000001")
    prefix = struct.pack("!BBBBIII16s", 3, 4, 64, 0xC0, 86400, 14400, 0,
                         bytes.fromhex("20010db8000100000000000000000000"))
    body = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0) + prefix
    pseudo = source + destination + struct.pack("!I3xB", len(body), 58)
    body = body[:2] + struct.pack("!H", _checksum(pseudo + body)) + body[4:]
    header = struct.pack("!IHBB16s16s", 0x60000000, len(body), 58, 255, source, destination)
    return ethernet(b"\x33\x33\x00\x00\x00\x01", source_mac, ETH_P_IPV6, header + body)


def send_frames(netns: str, frames: list[bytes], interface: str = "eth0") -> None:
    with NetworkNamespace(netns).entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    with sock:
        sock.bind((interface, 0))
        for frame in frames:
            sock.send(frame)


@contextlib.contextmanager
def capture(netns: str, interface: str) -> Iterator[list[bytes]]:
    """Every frame `interface` receives while the block runs, and 0.3 s after."""
    with NetworkNamespace(netns).entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    frames: list[bytes] = []
    with sock:
        sock.bind((interface, 0))
        yield frames
        deadline = time.monotonic() + 0.3
        while (left := deadline - time.monotonic()) > 0:
            if select.select([sock], [], [], left)[0]:
                data, meta = sock.recvfrom(65535)
                if meta[2] != socket.PACKET_OUTGOING:
                    frames.append(data)


def counter(netns: str, family: str, comment: str) -> int:
    """Packets counted by the rule of browservm's table whose comment contains `comment`."""
    listing = json.loads(run("nft", "-j", "list", "table", family, "browservm", netns=netns).stdout)["nftables"]
    for obj in listing:
        rule = obj.get("rule")
        if rule is not None and comment in rule.get("comment", ""):
            for expr in rule["expr"]:
                if "counter" in expr:
                    return int(expr["counter"]["packets"])
    raise AssertionError(f"no rule with a counter and comment {comment!r} in {family} browservm")


def set_isolated(ctl: str, port_name: str, isolated: bool) -> None:
    run("ip", "link", "set", port_name, "type", "bridge_slave", "isolated", "on" if isolated else "off", netns=ctl)


def test_vms_reach_only_the_guest_port_and_not_each_other(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, guest_ports=(GUEST_PORT,)) as net:
        net.up()
        ctl, a, b = net.ctl, net.guest("vm-aa"), net.guest("vm-bb")
        with listening(ctl, GATEWAY, GUEST_PORT), listening(ctl, GATEWAY, HOST_SERVICE_PORT), \
                listening(a.netns, a.ip, VNC_PORT), listening(b.netns, b.ip, VNC_PORT):
            assert can_connect(ctl, a.ip, VNC_PORT), "the controller must reach a VM's :6080"
            assert can_connect(a.netns, GATEWAY, GUEST_PORT), "a VM must reach the controller's guest port"
            assert not can_connect(a.netns, GATEWAY, HOST_SERVICE_PORT), "a VM reached a host service"
            assert not can_connect(a.netns, b.ip, VNC_PORT), "a VM reached another VM"

            # Each mechanism alone still separates the VMs ...
            set_isolated(ctl, a.lease.tap, False)
            set_isolated(ctl, b.lease.tap, False)
            assert not can_connect(a.netns, b.ip, VNC_PORT), "nftables alone let VM-to-VM through"
            with NetworkNamespace(ctl).entered():
                Nftables(ctl).delete_table()
                run("ip", "rule", "del", "pref", "100", netns=ctl)  # the routing barrier too: no mechanism left
            run("ip", "neigh", "flush", "dev", "eth0", netns=a.netns)  # forget the failed ARP of the attempts above
            assert can_connect(a.netns, b.ip, VNC_PORT, timeout=3), "control: the set-up cannot carry traffic"
            assert can_connect(a.netns, GATEWAY, HOST_SERVICE_PORT), "control: host service unreachable anyway"
            set_isolated(ctl, a.lease.tap, True)
            set_isolated(ctl, b.lease.tap, True)
            assert not can_connect(a.netns, b.ip, VNC_PORT), "port isolation alone let VM-to-VM through"

            # ... and `host up` repairs what is missing.
            assert not next(c for c in net.network.status() if c.piece.startswith("nftables")).ok
            net.network.up()
            assert not can_connect(a.netns, GATEWAY, HOST_SERVICE_PORT)
            assert can_connect(a.netns, GATEWAY, GUEST_PORT), "the restored table lacks the VMs' elements"


def test_another_local_user_cannot_open_a_vms_desktop(namespaces: Namespaces, tmp_path: Path) -> None:
    # A real unprivileged account (nobody) and root, the controller's user, both in the controller's namespace:
    # without a namespace of its own the VM network is reachable by every local user but for this rule.
    def connect_as(uid: int, address: str) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", net.ctl, "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                   "bash", "-c", f"exec 3<>/dev/tcp/{address}/{VNC_PORT}", check=False)

    with lab(namespaces, tmp_path) as net:
        net.up()
        guest = net.guest("vm-aa")
        with listening(guest.netns, guest.ip, VNC_PORT):
            before = counter(net.ctl, "inet", "only the controller connects to VMs (TCP)")
            refused = connect_as(NOBODY, guest.ip)
            assert refused.returncode != 0 and "Connection refused" in refused.stderr, refused
            assert counter(net.ctl, "inet", "only the controller connects to VMs (TCP)") == before + 1
            assert connect_as(0, guest.ip).returncode == 0, "control: the controller's user connects"
