"""The isolation rules, checked with real packets between real namespaces.

Two stand-in guests (namespaces behind veth pairs, attached to the bridge
exactly as TAPs are) try to reach each other, the host's services, and the
controller's guest-facing port. Controls switch each mechanism off to show
that the test's own set-up can carry the traffic being blocked.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.hostnet.firewall import Nftables
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.links import attach_port
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.rtnl import RtnlSocket
from browservm.netplan import NetworkPlan
from browservm.store import Store

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

GATEWAY = "192.168.100.1"
GUEST_PORT = 8089
HOST_SERVICE_PORT = 9099
VNC_PORT = 6080


def can_connect(netns: str, address: str, port: int) -> bool:
    with NetworkNamespace(netns).entered():
        try:
            socket.create_connection((address, port), timeout=1.0).close()
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


def add_guest(ctl: str, guest: str, port_name: str, address: str) -> None:
    run("ip", "link", "add", port_name, "type", "veth", "peer", "name", "eth0", "netns", guest, netns=ctl)
    with NetworkNamespace(ctl).entered():
        rtnl = RtnlSocket()
        attach_port(rtnl, socket.if_nametoindex(port_name), port_name, "br0", f"browservm vm={guest}", netns=ctl)
        rtnl.close()
    run("ip", "addr", "add", f"{address}/24", "dev", "eth0", netns=guest)
    run("ip", "link", "set", "eth0", "up", netns=guest)
    run("ip", "route", "add", "default", "via", GATEWAY, netns=guest)


def set_isolated(ctl: str, port_name: str, isolated: bool) -> None:
    run("ip", "link", "set", port_name, "type", "bridge_slave", "isolated", "on" if isolated else "off", netns=ctl)


def test_vms_reach_only_the_guest_port_and_not_each_other(namespaces: Namespaces, tmp_path: Path) -> None:
    ctl, guest_a, guest_b = namespaces.name(), namespaces.create("ga"), namespaces.create("gb")
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", guest_ports=(GUEST_PORT,))
    with HostNetwork(plan, Store(tmp_path / "state.sqlite3"), NetworkNamespace(ctl)) as network:
        network.up()
        add_guest(ctl, guest_a, "vga", "192.168.100.2")
        add_guest(ctl, guest_b, "vgb", "192.168.100.3")
        with listening(ctl, GATEWAY, GUEST_PORT), listening(ctl, GATEWAY, HOST_SERVICE_PORT), \
                listening(guest_a, "192.168.100.2", VNC_PORT), listening(guest_b, "192.168.100.3", VNC_PORT):
            assert can_connect(ctl, "192.168.100.2", VNC_PORT), "the controller must reach a VM's :6080"
            assert can_connect(guest_a, GATEWAY, GUEST_PORT), "a VM must reach the controller's guest port"
            assert not can_connect(guest_a, GATEWAY, HOST_SERVICE_PORT), "a VM reached a host service"
            assert not can_connect(guest_a, "192.168.100.3", VNC_PORT), "a VM reached another VM"

            # Each mechanism alone still separates the VMs ...
            set_isolated(ctl, "vga", False)
            set_isolated(ctl, "vgb", False)
            assert not can_connect(guest_a, "192.168.100.3", VNC_PORT), "nftables alone let VM-to-VM through"
            with NetworkNamespace(ctl).entered():
                Nftables(ctl).delete_table()
            assert can_connect(guest_a, "192.168.100.3", VNC_PORT), "control: the set-up cannot carry traffic"
            assert can_connect(guest_a, GATEWAY, HOST_SERVICE_PORT), "control: host service unreachable anyway"
            set_isolated(ctl, "vga", True)
            set_isolated(ctl, "vgb", True)
            assert not can_connect(guest_a, "192.168.100.3", VNC_PORT), "port isolation alone let VM-to-VM through"

            # ... and `host up` repairs the missing table.
            assert not next(c for c in network.status() if c.piece.startswith("nftables")).ok
            network.up()
            assert not can_connect(guest_a, GATEWAY, HOST_SERVICE_PORT)
        network.down(force=True)
