"""The ARP takeover, the metadata address and the forged source, from a real guest under QEMU (issue 10).

test_antispoof.py and test_isolation_egress.py make these attacks from stand-in guests (namespaces
behind veths); here a booted VM makes them from its own kernel, through its virtio NIC, QEMU and
its TAP. The image has no way in for a test, so the attacker boots a test-only image derived from
the minimal one (tests/support/derived_image.py) with one program and one unit added: a guest that
is root-compromised by construction.

The attacker connects to the controller's guest port on its gateway, the one thing a VM may reach
on the host, and takes its orders there, one line each, so every attack starts only when the test
is ready and the rule counters can be read around it. It prints one marker per attack on its
serial console (`browservm-attack: step=... status=done ...`), which the test waits for. The
channel is also a control: it keeps working after each attack.

One victim (the minimal image, untouched) and one attacker boot side by side once per module;
each attack runs with br_netfilter's switches off and on. Every address either side reaches lives
in this test's namespaces: a "wan" namespace behind the uplink holds the public address and
169.254.169.254.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from browservm.config import Settings
from browservm.controller import Controller
from browservm.guest.markers import parse_marker
from browservm.hostnet.netns import NetworkNamespace
from browservm.images.kernel_build import WITH_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from browservm.vm.console import ConsoleLog
from browservm.vm.readiness import desktop_banner
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from tests.support.derived_image import GuestFile, derive_image

from .conftest import Controllers, Namespaces, run
from .test_isolation import (
    ETH_P_ALL,
    GATEWAY,
    VNC_PORT,
    bridge_netfilter_fixture,  # noqa: F401 - the fixture, run with br_netfilter off and on
    counter,
    set_bridge_netfilter,
)

pytestmark = [pytest.mark.host, pytest.mark.vm]

GUEST_PORT = 8089  # the controller's guest-facing port: the attacker's orders come through it
UPLINK = "up0"
UPLINK_HOST, UPLINK_PEER = "198.51.100.1", "198.51.100.2"  # the controller's end and the wan's end
PUBLIC = "203.0.113.10"  # stands for the internet (TEST-NET-3), inside the wan namespace
METADATA = "169.254.169.254"  # the cloud metadata address, inside the wan namespace only
UDP_PORT = 9999
ATTACK_DEADLINE_S = 120.0  # one attack under TCG, from the order to its marker on the console

ARP_SPOOF = "ARP claiming another address than the VM's"
FORGED = "IPv4 from another address than the VM's"
NOT_PUBLIC = "not the public internet"

# --- the attacker's image ------------------------------------------------------------------------

ATTACK_PROGRAM = r'''#!/usr/bin/python3 -IS
"""test-only (tests/integration/test_attacks_real_guest.py): a root-compromised guest.

Connects to the controller's guest port on its gateway (browservm.attack=PORT on the kernel command
line) and runs each order the test sends there, one per line after its number; one marker per order
on the console, with that number:
    arp VICTIM                     VICTIM's address on eth0, gratuitous ARP and ARP replies claiming it
    metadata ADDRESS ALLOWED PORT  TCP to ADDRESS, then to ALLOWED (the control), from our own address
    forge VICTIM PORT TARGET...    UDP to each target from VICTIM's address, then one each from ours
"""
import shlex
import socket
import struct
import subprocess
import sys
import time
from ipaddress import IPv4Address

ETH_P_IP, ETH_P_ARP = 0x0800, 0x0806
BROADCAST = b"\xff" * 6


def marker(**fields):
    print("browservm-attack: " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in fields.items()), flush=True)


def ethernet(dst, src, kind, payload):
    return dst + src + struct.pack("!H", kind) + payload


def arp(op, sender_mac, sender_ip, target_mac, target_ip):
    return struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, op, sender_mac, IPv4Address(sender_ip).packed,
                       target_mac, IPv4Address(target_ip).packed)


def ipv4_udp(source, destination, dport, payload):
    udp = struct.pack("!HHHH", 4000, dport, 8 + len(payload), 0) + payload  # checksum 0: none, allowed in IPv4
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         IPv4Address(source).packed, IPv4Address(destination).packed)
    total = sum(struct.unpack("!10H", header))
    total = (total >> 16) + (total & 0xFFFF)
    checksum = ~(total + (total >> 16)) & 0xFFFF
    return header[:10] + struct.pack("!H", checksum) + header[12:] + udp


def send(frames):
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind(("eth0", 0))
        for frame in frames:
            sock.send(frame)


def default_gateway():
    with open("/proc/net/route") as table:
        for fields in (line.split() for line in table.readlines()[1:]):
            if fields[1] == "00000000":
                return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    raise LookupError("no default route")


def neighbour_mac(address):
    with open("/proc/net/arp") as table:
        for fields in (line.split() for line in table.readlines()[1:]):
            if fields[0] == address:
                return bytes.fromhex(fields[3].replace(":", ""))
    raise LookupError(f"no ARP entry for {address}")


class Attacker:
    def __init__(self, channel):
        self.me, self.gateway = channel.getsockname()[0], channel.getpeername()[0]
        with open("/sys/class/net/eth0/address") as address:
            self.mac = bytes.fromhex(address.read().strip().replace(":", ""))
        self.gateway_mac = neighbour_mac(self.gateway)  # learnt when the channel connected

    def arp(self, victim):
        # Hold the address as a real attacker would, so this guest would answer for it too.
        subprocess.run(["ip", "address", "replace", f"{victim}/32", "dev", "eth0"], check=True)
        claim = arp(1, self.mac, victim, bytes(6), victim)  # gratuitous: "the victim is at my MAC", to all
        reply = arp(2, self.mac, victim, self.gateway_mac, self.gateway)  # unsolicited, to the host
        frames = [ethernet(BROADCAST, self.mac, ETH_P_ARP, claim)] * 3 \
            + [ethernet(self.gateway_mac, self.mac, ETH_P_ARP, reply)] * 3
        send(frames)
        return {"frames": len(frames)}

    def metadata(self, address, allowed, port):
        return {"metadata": self.connect(address, int(port)), "control": self.connect(allowed, int(port))}

    def connect(self, address, port):
        try:  # from our own address, not the victim's that `arp` may have added
            socket.create_connection((address, port), timeout=5, source_address=(self.me, 0)).close()
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return type(exc).__name__
        return "connected"

    def forge(self, victim, port, *targets):
        forged = [ethernet(self.gateway_mac, self.mac, ETH_P_IP, ipv4_udp(victim, target, int(port), b"bvm-forged"))
                  for target in targets for _ in range(3)]
        honest = [ethernet(self.gateway_mac, self.mac, ETH_P_IP, ipv4_udp(self.me, target, int(port), b"bvm-honest"))
                  for target in targets]
        send(forged)
        send(honest)
        return {"forged": len(forged), "honest": len(honest)}


def main():
    with open("/proc/cmdline") as cmdline:
        words = dict(word.partition("=")[::2] for word in cmdline.read().split())
    port, gateway = int(words["browservm.attack"]), default_gateway()
    marker(status="waiting", gateway=gateway, port=port)
    deadline = time.monotonic() + 1800
    while True:
        try:
            channel = socket.create_connection((gateway, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                marker(status="gave-up")
                return 1
            time.sleep(1)
    channel.settimeout(None)
    with channel:
        attacker = Attacker(channel)
        marker(status="connected", address=attacker.me)
        for line in channel.makefile("r"):
            number, step, *args = line.split()
            if step not in ("arp", "metadata", "forge"):
                break
            try:
                marker(order=number, step=step, status="done", **getattr(attacker, step)(*args))
            except Exception as exc:
                marker(order=number, step=step, status="error", reason=repr(exc))
    marker(status="finished")
    return 0


sys.exit(main())
'''

ATTACK_UNIT = b"""[Unit]
Description=test-only: a root-compromised guest (tests/integration/test_attacks_real_guest.py)
ConditionKernelCommandLine=browservm.attack
Wants=browservm-net.service
After=browservm-net.service

[Service]
ExecStart=/usr/local/bin/browservm-attack
StandardOutput=journal+console
StandardError=journal+console
"""

# A drop-in rather than a .wants symlink: debugfs writes regular files and directories, and a
# drop-in's Wants= pulls the unit in just the same.
DROP_IN_DIR = "/etc/systemd/system/multi-user.target.d"
ATTACKER_FILES = {
    "/usr/local/bin/browservm-attack": GuestFile(ATTACK_PROGRAM.encode(), 0o755),
    "/etc/systemd/system/browservm-attack.service": GuestFile(ATTACK_UNIT),
    f"{DROP_IN_DIR}/browservm-attack.conf": GuestFile(b"[Unit]\nWants=browservm-attack.service\n"),
}

# --- the namespaces around the VMs ----------------------------------------------------------------


class UplinkControllers(Controllers):
    """Controllers whose VM network has an uplink (to the wan namespace) and one guest-facing port."""

    def settings(self, kernel: Path | None = None, vmm: str = "qemu", rootfs: Path | None = None,
                 accel: str = "auto") -> Settings:
        return super().settings(kernel, vmm, rootfs, accel).model_copy(
            update={"uplink": UPLINK, "guest_ports": (GUEST_PORT,)})


def make_wan(namespaces: Namespaces, ctl: str) -> str:
    """The uplink to a namespace holding the public address and the metadata address."""
    wan = namespaces.create("wan")
    run("ip", "link", "add", UPLINK, "type", "veth", "peer", "name", "eth0", "netns", wan, netns=ctl)
    run("ip", "addr", "add", f"{UPLINK_HOST}/24", "dev", UPLINK, netns=ctl)
    run("ip", "link", "set", UPLINK, "up", netns=ctl)
    run("ip", "route", "add", "default", "via", UPLINK_PEER, netns=ctl)
    run("ip", "addr", "add", f"{UPLINK_PEER}/24", "dev", "eth0", netns=wan)
    run("ip", "link", "set", "eth0", "up", netns=wan)
    run("ip", "link", "set", "lo", "up", netns=wan)
    for address in (PUBLIC, METADATA):
        run("ip", "addr", "add", f"{address}/32", "dev", "lo", netns=wan)
    return wan


@contextlib.contextmanager
def bound(netns: str, kind: socket.SocketKind, address: str, port: int) -> Iterator[socket.socket]:
    """A non-blocking TCP listener or UDP socket on `address`:`port` inside `netns`."""
    with NetworkNamespace(netns).entered():
        sock = socket.socket(socket.AF_INET, kind)
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the last test's connections are in TIME_WAIT
        sock.bind((address, port))
        if kind == socket.SOCK_STREAM:
            sock.listen()
        sock.setblocking(False)
        yield sock


def accepted(server: socket.socket) -> list[str]:
    """The peers of the connections the listener completed so far."""
    peers = []
    with contextlib.suppress(BlockingIOError):
        while True:
            connection, peer = server.accept()
            connection.close()
            peers.append(peer[0])
    return peers


def received(sock: socket.socket) -> list[tuple[bytes, str]]:
    datagrams = []
    with contextlib.suppress(BlockingIOError):
        while True:
            data, sender = sock.recvfrom(2048)
            datagrams.append((data, sender[0]))
    return datagrams


@contextlib.contextmanager
def sniff(netns: str, interface: str) -> Iterator[list[bytes]]:
    """Every frame through `interface`, either way, while the block runs (the guest's traffic included)."""
    with NetworkNamespace(netns).entered():
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    frames: list[bytes] = []
    with sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)  # the frames wait here until the end
        sock.bind((interface, 0))
        yield frames
        time.sleep(0.3)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                frames.append(sock.recv(65535))


def ipv4_to(frame: bytes, address: str) -> bool:
    return frame[12:14] == b"\x08\x00" and frame[30:34] == IPv4Address(address).packed


def neighbour(ctl: str, address: str) -> str | None:
    entries = json.loads(run("ip", "-j", "neigh", "show", address, "dev", "br0", netns=ctl).stdout or "[]")
    return str(entries[0].get("lladdr")) if entries else None


# --- one victim, one attacker ----------------------------------------------------------------------


@dataclass
class Hostile:
    controller: Controller
    wan: str
    victim: VmRecord
    attacker: VmRecord
    channel: socket.socket  # the attacker's connection to the guest port: orders go out on it
    console: ConsoleLog  # the attacker's
    sent: Iterator[int] = field(default_factory=itertools.count)

    @property
    def ctl(self) -> str:
        name = self.controller.network.netns.name
        assert name is not None
        return name

    def order(self, step: str, *args: str) -> dict[str, str]:
        """Send one order; the fields of the attacker's marker once it reports the attack made."""
        number = str(next(self.sent))  # each attack runs twice (br_netfilter off and on): whose marker is whose
        self.channel.sendall((" ".join([number, step, *args]) + "\n").encode())

        def reported(line: str) -> bool:
            marker = parse_marker(line)
            return marker is not None and marker[0] == "attack" and marker[1].get("order") == number

        line = asyncio.run(self.console.wait_for(reported, ATTACK_DEADLINE_S))
        if line is None:
            tail = "\n".join(self.console.tail(30))
            raise AssertionError(f"the attacker did not report {step} within {ATTACK_DEADLINE_S:g} s:\n{tail}")
        marker = parse_marker(line)
        assert marker is not None and marker[1]["status"] == "done", line
        return marker[1]


@pytest.fixture(scope="module")
def hostile(built: dict[str, BuiltKernel], minimal_image: RootfsImage,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """The victim and the attacker booted side by side, the attacker connected for orders; both VMs,
    the namespaces and the derived image removed at the end, even on failure."""
    directory = tmp_path_factory.mktemp("attacks")
    image = directory / "attacker.ext4"
    spaces = Namespaces()
    controllers = UplinkControllers(spaces, directory / "state", built[WITH_IP_PNP.name].vmlinux,
                                    minimal_image.path)
    try:
        derive_image(minimal_image.path, image, ATTACKER_FILES, directories=[DROP_IN_DIR])
        victims, attackers = controllers.open(), controllers.open(rootfs=image)
        ctl = victims.network.netns.name
        assert ctl is not None
        wan = make_wan(spaces, ctl)
        # Listening before the attacker boots: its connection waits in the backlog until accepted.
        with bound(ctl, socket.SOCK_STREAM, GATEWAY, GUEST_PORT) as orders:
            async def boot() -> tuple[VmRecord, VmRecord]:
                return await asyncio.gather(victims.manager.create(), attackers.manager.create(
                    extra_boot_args=(f"browservm.attack={GUEST_PORT}",)))

            started = time.monotonic()
            victim, attacker = asyncio.run(boot())
            print(f"\nvictim and attacker ready in {time.monotonic() - started:.0f} s")
            assert victim.state == VmState.READY, victim.failure
            assert attacker.state == VmState.READY, attacker.failure
            console = ConsoleLog(Path(attacker.directory) / "console.log")
            connected = asyncio.run(console.wait_for(lambda line: "browservm-attack: status=connected" in line, 60))
            assert connected is not None, "the attacker never connected:\n" + "\n".join(console.tail(30))
            channel, peer = orders.accept()
        with channel:
            channel.setblocking(True)
            # Control: the attacker reaches the guest port, from its own address.
            assert peer[0] == attacker.address.split("/")[0]
            yield Hostile(victims, wan, victim, attacker, channel, console)
    finally:
        try:
            controllers.cleanup()
        finally:
            spaces.cleanup()
            image.unlink(missing_ok=True)


# --- the attacks -----------------------------------------------------------------------------------


def test_arp_for_the_victims_address_does_not_take_over_the_hosts_neighbour_entry(
        hostile: Hostile, bridge_netfilter: bool) -> None:
    set_bridge_netfilter(hostile.ctl, bridge_netfilter)
    victim, attacker = hostile.victim, hostile.attacker
    victim_ip = victim.address.split("/")[0]
    before = counter(hostile.ctl, "bridge", ARP_SPOOF)

    report = hostile.order("arp", victim_ip)

    assert neighbour(hostile.ctl, victim_ip) == victim.mac, "the host now sends the victim's traffic elsewhere"
    assert counter(hostile.ctl, "bridge", ARP_SPOOF) >= before + int(report["frames"])
    # The controller still reaches the victim's desktop, and the victim's, not the attacker's (which
    # holds the address too and answers on 0.0.0.0:6080): the connection's frames go to the victim's TAP.
    with sniff(hostile.ctl, victim.tap) as to_victim, sniff(hostile.ctl, attacker.tap) as to_attacker:
        banner = asyncio.run(desktop_banner(NetworkNamespace(hostile.ctl), IPv4Address(victim_ip), VNC_PORT, 10,
                                            websocket=True))
    assert banner == "RFB 003.008"
    assert any(ipv4_to(frame, victim_ip) for frame in to_victim), "the connection never reached the victim's TAP"
    assert not any(ipv4_to(frame, victim_ip) for frame in to_attacker), "the victim's traffic went to the attacker"
    assert neighbour(hostile.ctl, attacker.address.split("/")[0]) == attacker.mac, "control: the attacker's own entry"


def test_the_metadata_address_is_out_of_reach_and_the_internet_is_not(
        hostile: Hostile, bridge_netfilter: bool) -> None:
    set_bridge_netfilter(hostile.ctl, bridge_netfilter)
    before = counter(hostile.ctl, "inet", NOT_PUBLIC)
    with bound(hostile.wan, socket.SOCK_STREAM, METADATA, 80) as metadata, \
            bound(hostile.wan, socket.SOCK_STREAM, PUBLIC, 80) as public:
        report = hostile.order("metadata", METADATA, PUBLIC, "80")
        reached_metadata, reached_public = accepted(metadata), accepted(public)

    assert report["metadata"] != "connected" and reached_metadata == [], (report, reached_metadata)
    assert counter(hostile.ctl, "inet", NOT_PUBLIC) > before
    # Control: the same connection to a public address goes through, masqueraded behind the uplink.
    assert report["control"] == "connected", report
    assert reached_public == [UPLINK_HOST]


def test_ipv4_with_the_victims_source_reaches_neither_the_host_nor_the_uplink(
        hostile: Hostile, bridge_netfilter: bool) -> None:
    set_bridge_netfilter(hostile.ctl, bridge_netfilter)
    victim_ip = hostile.victim.address.split("/")[0]
    before = counter(hostile.ctl, "bridge", FORGED)
    with bound(hostile.ctl, socket.SOCK_DGRAM, GATEWAY, UDP_PORT) as at_host, \
            bound(hostile.wan, socket.SOCK_DGRAM, PUBLIC, UDP_PORT) as beyond, \
            sniff(hostile.ctl, "br0") as on_bridge:
        report = hostile.order("forge", victim_ip, str(UDP_PORT), GATEWAY, PUBLIC)
        time.sleep(0.5)  # the honest datagram's way out through the uplink
        at_host_got, beyond_got = received(at_host), received(beyond)

    assert not [frame for frame in on_bridge if b"bvm-forged" in frame], "a forged packet entered the host"
    assert at_host_got == [] and not [d for d in beyond_got if d[0] == b"bvm-forged"], (at_host_got, beyond_got)
    assert counter(hostile.ctl, "bridge", FORGED) >= before + int(report["forged"])
    # Control: the same datagrams from the attacker's own address enter the host (the one to the gateway
    # is then dropped by the input chain, a VM reaching a host service) and leave through the uplink.
    assert len([frame for frame in on_bridge if b"bvm-honest" in frame]) == int(report["honest"]) == 2
    assert beyond_got == [(b"bvm-honest", UPLINK_HOST)]
