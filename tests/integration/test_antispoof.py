"""Layer-2 attacks by a root-compromised guest against its neighbours and the host (issue 10, item 1).

Each test performs the attack for real, with frames crafted on a raw socket in
the attacker's namespace, asserts that it fails and that the rule meant to stop
it counted it, and shows in a control that the legitimate traffic still flows.
Every test runs with br_netfilter's switches off and on (see test_isolation.py).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from browservm.hostnet.netns import NetworkNamespace

from .conftest import Namespaces, run
from .test_isolation import (
    ETH_P_ARP,
    ETH_P_IP,
    GATEWAY,
    GUEST_PORT,
    VNC_PORT,
    arp,
    bridge_netfilter_fixture,  # noqa: F401 - the fixture, run with br_netfilter off and on
    can_connect,
    capture,
    counter,
    ethernet,
    ipv4_udp,
    lab,
    listening,
    router_advertisement,
    send_frames,
)

pytestmark = pytest.mark.host

BROADCAST = b"\xff" * 6
ARP_SPOOF = "ARP claiming another address"
MAC_SPOOF = "with another source MAC"
FORGED = "IPv4 from another address"


def mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


@pytest.mark.parametrize("kind", ["gratuitous", "reply"])
def test_arp_for_another_vms_address_does_not_take_over_the_hosts_neighbour_entry(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool, kind: str) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, guest_ports=(GUEST_PORT,)) as net:
        net.up()
        victim, attacker = net.guest("vm-victim"), net.guest("vm-attacker")
        with listening(victim.netns, victim.ip, VNC_PORT), listening(net.ctl, GATEWAY, GUEST_PORT):
            assert can_connect(net.ctl, victim.ip, VNC_PORT)
            before = counter(net.ctl, "bridge", ARP_SPOOF)
            if kind == "gratuitous":  # "I am the victim", to everyone
                frame = arp(1, attacker.mac, victim.ip, b"\0" * 6, victim.ip)
                frames = [ethernet(BROADCAST, attacker.mac, ETH_P_ARP, frame)] * 3
            else:  # an unsolicited reply to the host: "the victim is at my MAC"
                frame = arp(2, attacker.mac, victim.ip, net.bridge_mac(), GATEWAY)
                frames = [ethernet(net.bridge_mac(), attacker.mac, ETH_P_ARP, frame)] * 3
            send_frames(attacker.netns, frames)

            assert net.neighbour(victim.ip) == victim.lease.mac, "the host now sends the victim's traffic elsewhere"
            assert counter(net.ctl, "bridge", ARP_SPOOF) >= before + 3
            assert can_connect(net.ctl, victim.ip, VNC_PORT), "the controller no longer reaches the victim"
            # Control: the attacker's own ARP and traffic still work.
            run("ip", "neigh", "flush", "dev", "eth0", netns=attacker.netns)
            assert can_connect(attacker.netns, GATEWAY, GUEST_PORT)


def test_a_frame_with_another_vms_mac_does_not_poison_the_bridge(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter) as net:
        net.up()
        victim, attacker = net.guest("vm-victim"), net.guest("vm-attacker")
        with listening(victim.netns, victim.ip, VNC_PORT):
            before = counter(net.ctl, "bridge", MAC_SPOOF)
            packet = ipv4_udp(victim.ip, GATEWAY, 5353, 9, b"poison")
            send_frames(attacker.netns, [ethernet(BROADCAST, victim.mac, ETH_P_IP, packet)] * 3)

            fdb = json.loads(run("bridge", "-j", "fdb", "show", "br", "br0", netns=net.ctl).stdout)
            where = {entry["ifname"] for entry in fdb if entry["mac"] == victim.lease.mac}
            assert where == {victim.lease.tap}, f"the bridge learnt the victim's MAC on {where}"
            assert counter(net.ctl, "bridge", MAC_SPOOF) >= before + 3
            assert can_connect(net.ctl, victim.ip, VNC_PORT), "control: the victim is reachable"


def test_ipv4_with_a_forged_source_reaches_neither_the_host_nor_the_uplink(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, uplink="up0") as net:
        net.up()
        wan = namespaces.create("wan")
        run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", wan, netns=net.ctl)
        run("ip", "addr", "add", "198.51.100.1/24", "dev", "up0", netns=net.ctl)
        run("ip", "link", "set", "up0", "up", netns=net.ctl)
        run("ip", "addr", "add", "198.51.100.2/24", "dev", "eth0", netns=wan)
        run("ip", "link", "set", "eth0", "up", netns=wan)
        victim, attacker = net.guest("vm-victim"), net.guest("vm-attacker")
        with NetworkNamespace(wan).entered():
            receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with receiver:
            receiver.bind(("198.51.100.2", 9999))
            receiver.settimeout(0.5)
            before = counter(net.ctl, "bridge", FORGED)
            gateway_mac = net.bridge_mac()
            forged = [ethernet(gateway_mac, attacker.mac, ETH_P_IP, ipv4_udp(source, destination, 4000, 9999, b"x"))
                      for source in (victim.ip, "203.0.113.7") for destination in (GATEWAY, "198.51.100.2")]
            with capture(net.ctl, "br0") as seen:
                send_frames(attacker.netns, forged)
            assert not [f for f in seen if f[26:30] != bytes(4) and f[12:14] == b"\x08\x00"], \
                "a forged packet reached the host"
            with pytest.raises(TimeoutError):
                receiver.recvfrom(100)
            assert counter(net.ctl, "bridge", FORGED) >= before + 4

            # Control: the same packet from the attacker's own address reaches both, masqueraded beyond the uplink.
            honest = ipv4_udp(attacker.ip, "198.51.100.2", 4000, 9999, b"honest")
            with capture(net.ctl, "br0") as seen:
                send_frames(attacker.netns, [ethernet(gateway_mac, attacker.mac, ETH_P_IP, honest)])
            assert any(b"honest" in f for f in seen)
            data, sender = receiver.recvfrom(100)
            assert (data, sender[0]) == (b"honest", "198.51.100.1")


def test_a_router_advertisement_from_a_vm_reaches_no_one(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, guest_ports=(GUEST_PORT,)) as net:
        net.up()
        attacker = net.guest("vm-attacker")
        run("sysctl", "-qw", "net.ipv6.conf.br0.accept_ra=2", netns=net.ctl)  # the host would listen to one
        before = counter(net.ctl, "bridge", "router advertisement")
        with capture(net.ctl, "br0") as seen:
            send_frames(attacker.netns, [router_advertisement(attacker.mac)] * 3)
        assert not [f for f in seen if f[12:14] == b"\x86\xdd"], "the RA reached the host"
        assert counter(net.ctl, "bridge", "router advertisement") >= before + 3
        assert "default" not in run("ip", "-6", "route", "show", netns=net.ctl).stdout
        assert can_connect(attacker.netns, GATEWAY, GUEST_PORT) is False  # nothing listens: control below
        with listening(net.ctl, GATEWAY, GUEST_PORT):
            assert can_connect(attacker.netns, GATEWAY, GUEST_PORT), "control: the VM's IPv4 still flows"


def test_a_vm_cannot_answer_as_a_dhcp_server(namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter) as net:
        net.up()
        attacker = net.guest("vm-attacker")
        before = counter(net.ctl, "bridge", "DHCP server")
        offer = ipv4_udp(attacker.ip, "255.255.255.255", 67, 68, b"\x02" + bytes(240))
        with capture(net.ctl, "br0") as seen:
            send_frames(attacker.netns, [ethernet(BROADCAST, attacker.mac, ETH_P_IP, offer)] * 2)
        assert not [f for f in seen if f[12:14] == b"\x08\x00" and f[34:36] == b"\x00\x43"]
        assert counter(net.ctl, "bridge", "DHCP server") >= before + 2


def test_a_port_that_is_not_a_vms_tap_is_named_and_reaches_nothing(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, guest_ports=(GUEST_PORT,)) as net:
        net.up()
        victim = net.guest("vm-victim")
        stranger = namespaces.create("st")
        run("ip", "link", "add", "stranger0", "type", "veth", "peer", "name", "eth0", "netns", stranger, netns=net.ctl)
        run("ip", "link", "set", "stranger0", "master", "br0", "up", netns=net.ctl)
        run("ip", "addr", "add", "192.168.100.77/24", "dev", "eth0", netns=stranger)
        run("ip", "link", "set", "eth0", "up", netns=stranger)

        checks = {c.piece: c for c in net.network.status()}
        assert not checks["port stranger0"].ok and "not a VM's TAP" in checks["port stranger0"].detail
        with listening(victim.netns, victim.ip, VNC_PORT), listening(net.ctl, GATEWAY, GUEST_PORT):
            assert not can_connect(stranger, victim.ip, VNC_PORT), "a foreign port reached a VM"
            assert not can_connect(stranger, GATEWAY, GUEST_PORT), "a foreign port reached the host"
            assert counter(net.ctl, "bridge", "claims a VM address in ARP") > 0
            assert can_connect(net.ctl, victim.ip, VNC_PORT), "control: the controller reaches the VM"
            assert can_connect(victim.netns, GATEWAY, GUEST_PORT), "control: the VM reaches the controller"
