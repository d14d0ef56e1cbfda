"""Where a VM may go, whom the host routes for, a flushed ruleset, someone else's bridge (issue 10, items 2-5).

Every address a stand-in guest tries lives inside this test's own namespaces:
a "wan" namespace behind the uplink plays the internet, the metadata service
and a private network beyond the uplink.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.egress import EgressPolicy
from browservm.errors import HostNetworkError
from browservm.hostnet.host import FIREWALL, HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store

from .conftest import Namespaces, run
from .test_isolation import (
    ETH_P_ARP,
    GATEWAY,
    GUEST_PORT,
    VNC_PORT,
    Lab,
    arp,
    bridge_netfilter_fixture,  # noqa: F401 - the fixture, run with br_netfilter off and on
    can_connect,
    counter,
    ethernet,
    lab,
    listening,
    send_frames,
)

pytestmark = pytest.mark.host

PUBLIC = "203.0.113.10"  # stands for the internet (TEST-NET-3), inside the wan namespace
METADATA = "169.254.169.254"
PRIVATE = "10.20.30.40"  # a private network beyond the uplink
CGNAT = "100.64.1.1"
HOST_OTHER = "172.31.0.1"  # the host's own address on another of its interfaces
BEYOND = (PUBLIC, METADATA, PRIVATE, CGNAT)
BLOCKED = "not the public internet"


def wan(net: Lab) -> str:
    """The uplink `up0` to a namespace holding every address beyond it, listening on port 80 of each."""
    space = net.namespaces.create("wan")
    run("ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", space, netns=net.ctl)
    run("ip", "addr", "add", "198.51.100.1/24", "dev", "up0", netns=net.ctl)
    run("ip", "link", "set", "up0", "up", netns=net.ctl)
    run("ip", "route", "add", "default", "via", "198.51.100.2", netns=net.ctl)
    run("ip", "addr", "add", "198.51.100.2/24", "dev", "eth0", netns=space)
    run("ip", "link", "set", "eth0", "up", netns=space)
    run("ip", "link", "set", "lo", "up", netns=space)
    for address in BEYOND:
        run("ip", "addr", "add", f"{address}/32", "dev", "lo", netns=space)
    run("ip", "route", "add", "default", "via", "198.51.100.1", netns=space)
    # An interface of the host's own, not the uplink, with a service on it.
    run("ip", "link", "add", "svc0", "type", "veth", "peer", "name", "svc1", netns=net.ctl)
    run("ip", "addr", "add", f"{HOST_OTHER}/24", "dev", "svc0", netns=net.ctl)
    run("ip", "link", "set", "svc0", "up", netns=net.ctl)
    return space


@contextlib.contextmanager
def services(space: str, ctl: str) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for address in BEYOND:
            stack.enter_context(listening(space, address, 80))
        stack.enter_context(listening(ctl, HOST_OTHER, 80))
        yield


def reachable(net: Lab, netns: str) -> set[str]:
    return {a for a in (*BEYOND, HOST_OTHER) if can_connect(netns, a, 80, timeout=0.5)}


def test_a_vm_reaches_the_public_internet_only_and_the_lists_say_otherwise(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, uplink="up0") as net:
        net.up()
        space = wan(net)
        guest = net.guest("vm-guest")
        with services(space, net.ctl):
            assert reachable(net, net.ctl) == {*BEYOND, HOST_OTHER}, "control: the set-up cannot carry traffic"
            before = counter(net.ctl, "inet", BLOCKED)
            assert reachable(net, guest.netns) == {PUBLIC}
            assert counter(net.ctl, "inet", BLOCKED) >= before + 3  # metadata, private, CGNAT (each retried)

            # The lists: a private network allowed, a public address denied, and deny wins over allow.
            plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", uplink="up0",
                                     egress_allow=(IPv4Network("10.20.30.0/24"), IPv4Network("203.0.113.0/24")),
                                     egress_deny=(IPv4Network(f"{PUBLIC}/32"),))
            store = Store(tmp_path / "state.sqlite3")
            with HostNetwork(plan, store, NetworkNamespace(net.ctl)) as network:
                changes = {c.piece: c.action for c in network.up()}
                assert changes[FIREWALL] == "updated"
                assert reachable(net, guest.netns) == {PRIVATE}
                assert all(c.ok for c in network.status() if not c.piece.startswith("uplink"))


def test_forwarding_turned_on_for_vms_routes_for_no_one_else(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter) as net:
        net.up()
        left, right = namespaces.create("left"), namespaces.create("right")
        for space, name, subnet in ((left, "lft0", "10.1.0"), (right, "rgt0", "10.2.0")):
            run("ip", "link", "add", name, "type", "veth", "peer", "name", "eth0", "netns", space, netns=net.ctl)
            run("ip", "addr", "add", f"{subnet}.1/24", "dev", name, netns=net.ctl)
            run("ip", "link", "set", name, "up", netns=net.ctl)
            run("ip", "addr", "add", f"{subnet}.2/24", "dev", "eth0", netns=space)
            run("ip", "link", "set", "eth0", "up", netns=space)
            run("ip", "route", "add", "default", "via", f"{subnet}.1", netns=space)
        assert run("sysctl", "-n", "net.ipv4.ip_forward", netns=net.ctl).stdout.strip() == "1"
        with listening(right, "10.2.0.2", 80):
            before = counter(net.ctl, "inet", "routes for its VMs only")
            assert not can_connect(left, "10.2.0.2", 80), "the host routed between two interfaces not its VMs'"
            assert counter(net.ctl, "inet", "routes for its VMs only") > before
            with NetworkNamespace(net.ctl).entered():
                net.network._nft.delete_table()
            assert can_connect(left, "10.2.0.2", 80), "control: without the table the host routes them"
            assert [c.piece for c in net.network.check_and_restore()] == [FIREWALL]
            assert not can_connect(left, "10.2.0.2", 80)


def test_a_flushed_ruleset_fails_closed_and_is_put_back_within_one_check(
        namespaces: Namespaces, tmp_path: Path, bridge_netfilter: bool) -> None:
    with lab(namespaces, tmp_path, bridge_netfilter, uplink="up0", guest_ports=(GUEST_PORT,)) as net:
        net.up()
        space = wan(net)
        victim, attacker = net.guest("vm-victim"), net.guest("vm-attacker")
        assert net.network.check_and_restore() == []
        started = time.perf_counter()
        assert net.network.check_and_restore() == []
        quiet_check = time.perf_counter() - started
        assert quiet_check < 0.5, f"a check with nothing to restore took {quiet_check:.3f} s"

        with services(space, net.ctl), listening(victim.netns, victim.ip, VNC_PORT), \
                listening(net.ctl, GATEWAY, GUEST_PORT):
            assert reachable(net, attacker.netns) == {PUBLIC}
            run("nft", "flush", "ruleset", netns=net.ctl)  # as Debian's nftables.service does on reload

            # Until the check runs: the VMs are routed nowhere, and ARP cannot take over the victim's address.
            assert reachable(net, attacker.netns) == set(), "a VM was routed while the ruleset was gone"
            grat = arp(1, attacker.mac, victim.ip, b"\0" * 6, victim.ip)
            send_frames(attacker.netns, [ethernet(b"\xff" * 6, attacker.mac, ETH_P_ARP, grat)] * 3)
            assert net.neighbour(victim.ip) == victim.lease.mac
            drift = next(c for c in net.network.status() if c.piece == FIREWALL)
            assert not drift.ok and drift.detail == "missing"

            restored = net.network.check_and_restore()
            assert [(c.piece, c.action, c.detail) for c in restored] == [(FIREWALL, "restored", "missing")]
            assert net.network.check_and_restore() == []
            checks = {c.piece: c for c in net.network.status()}
            assert checks[FIREWALL].ok, checks[FIREWALL].detail
            assert "restored 1 time(s)" in checks["nftables drift"].detail
            assert [what for _, what in net.network.drift_events()] == [f"{FIREWALL}: missing"]
            # The running VMs' elements came back with the tables, in the same transaction.
            assert reachable(net, attacker.netns) == {PUBLIC}
            assert can_connect(net.ctl, victim.ip, VNC_PORT)
            assert can_connect(attacker.netns, GATEWAY, GUEST_PORT)

            # A changed rule is drift too, and so is a routing rule removed.
            run("nft", "insert", "rule", "inet", "browservm", "forward", "accept", netns=net.ctl)
            run("ip", "rule", "del", "pref", "100", netns=net.ctl)
            restored = net.network.check_and_restore()
            assert {(c.piece, c.action) for c in restored} == {(FIREWALL, "restored"), ("routing rule br0", "restored")}
            assert reachable(net, attacker.netns) == {PUBLIC}


def test_host_up_refuses_a_bridge_browservm_did_not_create_unless_told_to_adopt_it(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    run("ip", "link", "add", "br0", "type", "bridge", netns=ns)
    run("ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1-peer", netns=ns)
    run("ip", "link", "set", "eth1", "master", "br0", netns=ns)
    run("ip", "addr", "add", "192.168.100.1/24", "dev", "br0", netns=ns)
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network, \
            pytest.raises(HostNetworkError, match="not created by browservm") as refused:
        network.up()
    message = str(refused.value)
    assert "ports eth1" in message and "addresses 192.168.100.1/24" in message and "--adopt-bridge" in message
    assert refused.value.device == "br0"
    assert run("nft", "list", "ruleset", netns=ns).stdout.strip() == ""

    with HostNetwork(plan, store, NetworkNamespace(ns), adopt_bridge=True) as network:
        changes = {c.piece: c for c in network.up()}
        assert changes["bridge br0"].action == "adopted"
        assert "WARNING" in changes["bridge br0"].detail and "eth1" in changes["bridge br0"].detail
        checks = {c.piece: c for c in network.status()}
        assert not checks["port eth1"].ok  # a port that is not a VM's: named, and its frames dropped
        lease = Ipam(store, plan).lease("vm-a")
        network.add_tap(lease)
        assert network.remove_tap("vm-a")
        Ipam(store, plan).release("vm-a")
        network.down()
    assert "br0" in run("ip", "-br", "link", netns=ns).stdout  # not ours: left in place




def test_each_template_s_egress_policy_holds_for_its_vms_beside_the_host_s(
        namespaces: Namespaces, tmp_path: Path) -> None:
    """Three VMs at once: the host's policy, a template with no internet but one private network, a
    template with the internet but not one public address; the host's denylist wins over all."""
    host_deny = (IPv4Network(f"{CGNAT}/32"),)
    with lab(namespaces, tmp_path, uplink="up0", egress_deny=host_deny) as net:
        net.up()
        space = wan(net)
        closed = EgressPolicy(internet=False, allow=(IPv4Network("10.20.30.0/24"), IPv4Network("100.64.0.0/10")))
        open_but = EgressPolicy(internet=True, deny=(IPv4Network(f"{PUBLIC}/32"),))
        host_s, kiosk, partner = (net.guest("vm-host"), net.guest("vm-kiosk", closed),
                                  net.guest("vm-partner", open_but))
        with services(space, net.ctl):
            assert reachable(net, net.ctl) == {*BEYOND, HOST_OTHER}, "control: the set-up cannot carry traffic"
            assert reachable(net, host_s.netns) == {PUBLIC}
            before = counter(net.ctl, "inet", "template reaches no internet")
            assert reachable(net, kiosk.netns) == {PRIVATE}, "the kiosk reached beyond its allowlist (or not it)"
            assert counter(net.ctl, "inet", "template reaches no internet") > before
            assert reachable(net, partner.netns) == set()  # PUBLIC denied; the rest is not the internet
            assert all(c.ok for c in net.network.status() if not c.piece.startswith("uplink"))

            # A policy's elements removed by hand: the status names the port, the next check puts them back.
            run("nft", "flush", "set", "bridge", "browservm", "vm_egress_allow", netns=net.ctl)
            assert reachable(net, kiosk.netns) == set()
            firewall = next(c for c in net.network.status() if c.piece == FIREWALL)
            assert not firewall.ok and kiosk.lease.tap in firewall.detail and "egress policy" in firewall.detail
            assert [c.piece for c in net.network.check_and_restore()] == [FIREWALL]
            assert reachable(net, kiosk.netns) == {PRIVATE}

            # A flushed ruleset comes back with every VM's policy.
            run("nft", "flush", "ruleset", netns=net.ctl)
            assert [c.piece for c in net.network.check_and_restore()] == [FIREWALL]
            assert (reachable(net, host_s.netns), reachable(net, kiosk.netns), reachable(net, partner.netns)) \
                == ({PUBLIC}, {PRIVATE}, set())

        # A VM's end takes its policy's elements with it, also when its lease went first.
        net.network.remove_tap("vm-kiosk")
        net.ipam.release("vm-partner")
        net.network.remove_tap("vm-partner")
        listing = json.loads(run("nft", "-j", "list", "table", "bridge", "browservm", netns=net.ctl).stdout)
        held = [obj for obj in listing["nftables"]
                if obj.get("set", obj.get("map", {})).get("name", "").startswith("vm_egress")]
        assert [body.get("elem", []) for obj in held for body in obj.values()] == [[], [], []]
