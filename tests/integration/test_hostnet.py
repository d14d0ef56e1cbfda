"""Host networking against real kernel objects, inside throwaway namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute  # type: ignore[import-untyped]

from browservm.errors import HostNetworkError
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store

from .conftest import Namespaces, run

pytestmark = pytest.mark.host


def browservm(*args: str, state: Path, netns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "browservm", *args, "--netns", netns, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, check=False)


def nft_table(netns: str) -> list[dict[str, Any]]:
    listing: list[dict[str, Any]] = json.loads(run("nft", "-j", "list", "table", "inet", "browservm",
                                                   netns=netns).stdout)["nftables"]
    return listing


def test_host_up_creates_each_piece_inside_the_namespace_and_a_second_run_changes_nothing(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    first = browservm("host", "up", "--json", "--uplink", "eth7", state=tmp_path, netns=ns)
    assert first.returncode == 0, first.stderr
    actions = {c["piece"]: c["action"] for c in json.loads(first.stdout)["changes"]}
    assert actions == {
        f"netns {ns}": "created",
        "sysctl net.ipv4.ip_forward": "updated",
        "bridge br0": "created",
        "address 192.168.100.1/24 on br0": "created",
        "routing rule br0": "created",
        "nftables tables inet+bridge browservm": "created",
    }
    assert run("cat", "/proc/sys/net/ipv4/ip_forward", netns=ns).stdout.strip() == "1"
    table_before = nft_table(ns)

    second = browservm("host", "up", "--json", "--uplink", "eth7", state=tmp_path, netns=ns)
    assert second.returncode == 0, second.stderr
    assert {c["action"] for c in json.loads(second.stdout)["changes"]} == {"unchanged"}
    assert nft_table(ns) == table_before  # same handles: the table was not even replaced

    status = browservm("host", "status", "--json", "--uplink", "eth7", state=tmp_path, netns=ns)
    checks = {c["piece"]: c for c in json.loads(status.stdout)["checks"]}
    assert checks["uplink eth7"]["ok"] is False and checks["uplink eth7"]["detail"] == "missing"
    assert all(c["ok"] for piece, c in checks.items() if piece != "uplink eth7")

    down = browservm("host", "down", "--json", state=tmp_path, netns=ns)
    assert down.returncode == 0, down.stderr
    assert not NetworkNamespace(ns).exists()


def test_fifty_taps_are_attached_isolated_owned_and_removed_without_leftovers(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", uplink="eth0", guest_ports=(8089,))
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, plan)
    with HostNetwork(plan, store, NetworkNamespace(ns), tap_owner=(1000, 1000)) as network:
        network.up()
        leases = [ipam.lease(f"vm-{i}") for i in range(50)]
        for lease in leases:
            network.add_tap(lease)

        with IPRoute(netns=ns) as ipr:
            bridge = ipr.link("get", ifname="br0")[0]
            for lease in leases:
                link = ipr.link("get", ifname=lease.tap)[0]
                data = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
                assert link.get("master") == bridge["index"]
                assert link["flags"] & 1, f"{lease.tap} is down"
                assert link.get("ifalias") == f"browservm vm={lease.vm_id} owner={network.owner}"
                assert data.get_attr("IFLA_TUN_TYPE") == 2  # a TAP, not a TUN
                assert (data.get_attr("IFLA_TUN_OWNER"), data.get_attr("IFLA_TUN_GROUP")) == (1000, 1000)
                port = ipr.brport("show", index=link["index"])[0]
                assert port.get_nested("IFLA_PROTINFO", "IFLA_BRPORT_ISOLATED") == 1

        rules = [o["rule"] for o in nft_table(ns) if "rule" in o]
        verdicts = {r["comment"]: r["expr"][-1] for r in rules}
        assert verdicts["browservm: no VM-to-VM traffic"] == {"drop": None}
        assert verdicts["browservm: masquerade VM traffic to the uplink"] == {"masquerade": None}
        assert verdicts["browservm: the controller's guest-facing ports"] == {"accept": None}

        checks = network.status()
        problems = [c for c in checks if not c.ok and not c.piece.startswith("uplink")]
        assert not problems
        assert any(c.piece == "taps" and c.detail.startswith("50 attached") for c in checks)

        for lease in leases:
            assert network.remove_tap(lease.vm_id)
            assert not network.remove_tap(lease.vm_id)  # idempotent
            assert ipam.release(lease.vm_id) == lease
        assert [line for line in run("ip", "-o", "link", "show", "type", "tun", netns=ns).stdout.splitlines()] == []
        network.down()
    assert not NetworkNamespace(ns).exists()
    assert ipam.leases() == []


def test_a_subnet_larger_than_a_slash_22_spans_one_bridge_per_segment(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("10.40.0.0/21"), "vmbr")
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, plan)
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        addresses = json.loads(run("ip", "-j", "-4", "addr", "show", "type", "bridge", netns=ns).stdout)
        assert {(a["ifname"], a["addr_info"][0]["local"], a["addr_info"][0]["prefixlen"])
                for a in addresses if a.get("addr_info")} == {
            ("vmbr", "10.40.0.1", 22), ("vmbr-1", "10.40.4.1", 22)}
        leases = [ipam.lease(f"vm-{i}") for i in range(plan.segments[0].capacity + 1)]
        for lease in leases[1:-1]:  # keep the first VM of each segment
            ipam.release(lease.vm_id)
        for lease in (leases[0], leases[-1]):
            network.add_tap(lease)
        assert (leases[0].bridge, leases[-1].bridge) == ("vmbr", "vmbr-1")
        masters = {link["ifname"]: link.get("master") for link in
                   json.loads(run("ip", "-j", "link", "show", "type", "tun", netns=ns).stdout)}
        assert masters == {leases[0].tap: "vmbr", leases[-1].tap: "vmbr-1"}
        forward = [o["rule"] for o in nft_table(ns) if "rule" in o and o["rule"]["chain"] == "forward"]
        assert forward[0]["expr"][0]["match"]["right"] == {"set": ["vmbr", "vmbr-1"]}
        assert all(c.ok for c in network.status())
        network.down(force=True)


def test_down_removes_only_what_up_created(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()  # the namespace, the bridge and its address were there before browservm
    run("ip", "link", "add", "br0", "type", "bridge", netns=ns)
    # Labelled as browservm labels its bridges (say, by another state directory): `up` may use it.
    run("ip", "link", "set", "br0", "alias", "browservm bridge", netns=ns)
    run("ip", "addr", "add", "192.168.100.1/24", "dev", "br0", netns=ns)
    run("ip", "link", "add", "keep0", "type", "veth", "peer", "name", "keep1", netns=ns)

    up = browservm("host", "up", "--json", state=tmp_path, netns=ns)
    assert up.returncode == 0, up.stderr
    actions = {c["piece"]: c["action"] for c in json.loads(up.stdout)["changes"]}
    assert actions[f"netns {ns}"] == "unchanged"
    assert actions["address 192.168.100.1/24 on br0"] == "unchanged"
    assert actions["bridge br0"] == "updated"  # it was down; set up

    down = browservm("host", "down", state=tmp_path, netns=ns)
    assert down.returncode == 0, down.stderr
    assert NetworkNamespace(ns).exists()
    links = run("ip", "-br", "addr", netns=ns).stdout
    assert "192.168.100.1/24" in links and "keep0" in links
    assert run("nft", "list", "ruleset", netns=ns).stdout.strip() == ""
    assert "br0" not in run("ip", "rule", "show", netns=ns).stdout
    assert run("cat", "/proc/sys/net/ipv4/ip_forward", netns=ns).stdout.strip() == "0"


def test_down_refuses_while_vms_hold_leases_and_force_cleans_everything(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        network.add_tap(Ipam(store, plan).lease("vm-busy"))
        refused = browservm("host", "down", state=tmp_path, netns=ns)
        assert refused.returncode == 1
        assert "vm-busy" in refused.stderr and "--force" in refused.stderr
        assert NetworkNamespace(ns).exists()
    forced = browservm("host", "down", "--force", state=tmp_path, netns=ns)
    assert forced.returncode == 0, forced.stderr
    assert not NetworkNamespace(ns).exists()
    assert Ipam(store, plan).leases() == []


def test_status_names_each_broken_piece(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        lease = Ipam(store, plan).lease("vm-lost")  # a lease whose TAP is missing
        run("ip", "addr", "flush", "dev", "br0", netns=ns)
        run("nft", "add", "rule", "inet", "browservm", "input", "accept", netns=ns)
        run("ip", "tuntap", "add", "fc-stray", "mode", "tap", netns=ns)
        run("ip", "link", "set", "fc-stray", "alias", f"browservm vm=vm-gone owner={network.owner}", netns=ns)
        run("ip", "tuntap", "add", "fc-theirs", "mode", "tap", netns=ns)  # another controller's: not ours
        run("ip", "link", "set", "fc-theirs", "alias", "browservm vm=vm-gone owner=0ther000", netns=ns)

        result = browservm("host", "status", state=tmp_path, netns=ns)
        assert result.returncode == 1
        report = {line.split()[1] + " " + line.split()[2]: line for line in result.stdout.splitlines()}
        assert report["bridge br0"].startswith("FAIL")
        assert "gateway address: expected 192.168.100.1/24, found none" in report["bridge br0"]
        assert "changed since browservm installed it" in report["nftables tables"]
        assert "rule inet browservm input 'accept': expected absent, found accept" in report["nftables tables"]
        assert "orphan: VM vm-gone holds no lease" in report["tap fc-stray"]
        assert "tap fc-theirs" not in report
        assert f"VM vm-lost has no TAP {lease.tap}" in report[f"lease {lease.address.ip}"]

        repaired = browservm("host", "up", "--json", state=tmp_path, netns=ns)
        actions = {c["piece"]: c["action"] for c in json.loads(repaired.stdout)["changes"]}
        assert actions["nftables tables inet+bridge browservm"] == "updated"
        assert actions["address 192.168.100.1/24 on br0"] == "created"
    browservm("host", "down", "--force", state=tmp_path, netns=ns)


def test_a_subnet_already_in_use_in_the_namespace_is_refused(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    run("ip", "link", "add", "other0", "type", "veth", "peer", "name", "other1", netns=ns)
    run("ip", "addr", "add", "192.168.100.77/25", "dev", "other0", netns=ns)
    result = browservm("host", "up", state=tmp_path, netns=ns)
    assert result.returncode == 1
    assert "192.168.100.77/25 on other0 overlaps the VM subnet 192.168.100.0/24" in result.stderr
    assert "br0" not in run("ip", "-br", "link", netns=ns).stdout


def test_a_subnet_another_route_leads_into_is_refused_and_a_public_one_never_accepted(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    # A route, not an address: a LAN or VPN reached through another link, whose traffic VMs would take over.
    run("ip", "link", "add", "vpn0", "type", "veth", "peer", "name", "vpn1", netns=ns)
    run("ip", "link", "set", "vpn0", "up", netns=ns)
    run("ip", "route", "add", "192.168.100.128/25", "dev", "vpn0", netns=ns)
    result = browservm("host", "up", state=tmp_path, netns=ns)
    assert result.returncode == 1
    assert "a route to 192.168.100.128/25 via vpn0 overlaps the VM subnet 192.168.100.0/24" in result.stderr
    assert "br0" not in run("ip", "-br", "link", netns=ns).stdout
    # A subnet outside private space is refused before anything is looked at, naming the field.
    public = browservm("host", "up", "--subnet", "8.8.0.0/24", state=tmp_path, netns=ns)
    assert public.returncode != 0 and "subnet" in public.stderr and "RFC 1918" in public.stderr


def test_a_tap_that_exists_is_not_silently_reused_and_another_vms_tap_is_not_deleted(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, plan)
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        lease = ipam.lease("vm-a")
        network.add_tap(lease)
        with pytest.raises(HostNetworkError, match="already exists") as excinfo:
            network.add_tap(lease)
        assert excinfo.value.device == lease.tap and excinfo.value.netns == ns
        impostor = ipam.lease("vm-b")
        run("ip", "link", "set", lease.tap, "alias", f"browservm vm=vm-b owner={network.owner}", netns=ns)
        with pytest.raises(HostNetworkError, match="not VM vm-a"):
            network.remove_tap(lease.vm_id)
        assert impostor.tap != lease.tap
        network.down(force=True)


def test_a_taps_link_is_held_down_and_brought_up_again_as_a_port_still(namespaces: Namespaces, tmp_path: Path) -> None:
    """What a restored Firecracker VM's TAP goes through: down before its VMM resumes, up once the
    guest took its identity; it stays its bridge's isolated port throughout."""
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        lease = Ipam(store, plan).lease("vm-a")
        network.add_tap(lease)

        def link() -> dict[str, Any]:
            [shown] = json.loads(run("ip", "-j", "-d", "link", "show", lease.tap, netns=ns).stdout)
            return shown  # type: ignore[no-any-return]

        assert "UP" in link()["flags"]
        network.set_tap_up(lease.tap, False)
        assert "UP" not in link()["flags"]
        network.set_tap_up(lease.tap, True)
        shown = link()
        assert "UP" in shown["flags"] and shown["master"] == "br0" and shown["linkinfo"]["info_slave_data"]["isolated"]
        with pytest.raises(HostNetworkError, match="set TAP up") as excinfo:
            network.set_tap_up("tap-nothere", True)
        assert excinfo.value.device == "tap-nothere"
        network.remove_tap(lease.vm_id)
        network.down(force=True)


def test_a_missing_bridge_is_named_when_a_tap_is_added(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network, \
            pytest.raises(HostNetworkError, match="bridge br0 does not exist; run `browservm host up`"):
        network.add_tap(Ipam(store, plan).lease("vm-a"))
    assert run("ip", "-o", "link", "show", "type", "tun", netns=ns).stdout == ""


def test_a_tap_that_cannot_join_its_bridge_is_removed_again(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    run("ip", "link", "add", "br0", "type", "veth", "peer", "name", "br0-peer", netns=ns)  # not a bridge
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    lease = Ipam(store, plan).lease("vm-a")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network, \
            pytest.raises(HostNetworkError, match="attach to br0") as excinfo:
        network.add_tap(lease)
    assert excinfo.value.device == lease.tap
    assert run("ip", "-o", "link", "show", "type", "tun", netns=ns).stdout == ""


def test_bad_input_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "browservm", "host", "up", "--json", "--netns", "../etc",
                             "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    error = json.loads(result.stdout)["error"]
    assert error["type"] == "InvalidInput" and error["field"] == "netns"
    assert not (tmp_path / "state.sqlite3").exists()
