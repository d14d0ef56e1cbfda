"""A crash at any point of the host network's setup leaves nothing that `host down` or `vm rm` cannot clean.

Each test kills browservm with SIGKILL at one crash point (see faults.py), as a
power cut or `kill -9` would, and then checks what the next command does with
what was left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.errors import HostNetworkError
from browservm.faults import ENV as CRASH_AT
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.links import create_tap
from browservm.hostnet.netns import NetworkNamespace
from browservm.ids import names_for
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

UP_POINTS = ["host.netns.created", "host.sysctl.created", "host.bridge.created", "host.address.created",
             "host.nft.created"]
INSIDE_POINTS = UP_POINTS[1:]  # the ones `up` passes in a namespace that was already there


def browservm(*args: str, state: Path, netns: str, crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_AT}
    if crash_at is not None:
        env[CRASH_AT] = crash_at
    return subprocess.run([sys.executable, "-m", "browservm", *args, "--netns", netns, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60, check=False, env=env)


def crash_up(state: Path, netns: str, point: str) -> None:
    crashed = browservm("host", "up", state=state, netns=netns, crash_at=point)
    assert crashed.returncode == -signal.SIGKILL, f"did not die at {point}: {crashed.returncode} {crashed.stderr}"


def down(state: Path, netns: str, *args: str) -> dict[str, str]:
    result = browservm("host", "down", "--json", *args, state=state, netns=netns)
    assert result.returncode == 0, result.stderr
    return {c["piece"]: c["action"] for c in json.loads(result.stdout)["changes"]}


def ip_forward(netns: str) -> str:
    return run("cat", "/proc/sys/net/ipv4/ip_forward", netns=netns).stdout.strip()


def nothing_of_browservm_in(netns: str, bridge_was_there: bool = False) -> None:
    links = {link["ifname"]: link for link in json.loads(run("ip", "-j", "addr", "show", netns=netns).stdout)}
    assert ("br0" in links) == bridge_was_there
    addresses = [a["local"] for link in links.values() for a in link.get("addr_info", [])]
    assert "192.168.100.1" not in addresses
    listed = run("nft", "list", "table", "inet", "browservm", netns=netns, check=False)
    assert listed.returncode != 0 and "No such file or directory" in listed.stderr, listed.stdout


@pytest.mark.parametrize("point", UP_POINTS)
def test_down_after_a_crash_in_up_removes_the_namespace_up_created(
        namespaces: Namespaces, tmp_path: Path, point: str) -> None:
    ns = namespaces.name()
    crash_up(tmp_path, ns, point)
    assert NetworkNamespace(ns).exists()
    down(tmp_path, ns)
    assert not NetworkNamespace(ns).exists()


@pytest.mark.parametrize("point", INSIDE_POINTS)
def test_down_after_a_crash_in_up_removes_what_up_made_in_a_namespace_it_keeps(
        namespaces: Namespaces, tmp_path: Path, point: str) -> None:
    ns = namespaces.create()  # there before browservm: `down` must keep it
    forwarding = ip_forward(ns)
    assert forwarding != "1"
    crash_up(tmp_path, ns, point)
    down(tmp_path, ns)
    assert NetworkNamespace(ns).exists()
    nothing_of_browservm_in(ns)
    assert ip_forward(ns) == forwarding


def test_down_after_a_crash_removes_the_address_up_added_but_keeps_the_bridge_it_found(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()
    run("ip", "link", "add", "br0", "type", "bridge", netns=ns)
    # Labelled as browservm labels its bridges (another state directory's): `up` may use it, not remove it.
    run("ip", "link", "set", "br0", "alias", "browservm bridge", netns=ns)
    crash_up(tmp_path, ns, "host.address.created")
    assert "192.168.100.1/24" in run("ip", "-br", "addr", "show", "br0", netns=ns).stdout
    down(tmp_path, ns)
    nothing_of_browservm_in(ns, bridge_was_there=True)


SECOND_UP = {  # what a second `up` does after a crash at each point, in a namespace the first one created
    "host.netns.created": ("unchanged", "updated", "created", "created", "created", "created"),
    "host.sysctl.created": ("unchanged", "unchanged", "created", "created", "created", "created"),
    "host.bridge.created": ("unchanged", "unchanged", "updated", "created", "created", "created"),
    "host.address.created": ("unchanged", "unchanged", "unchanged", "unchanged", "created", "created"),
    "host.nft.created": ("unchanged", "unchanged", "unchanged", "unchanged", "unchanged", "updated"),
}


@pytest.mark.parametrize("point", UP_POINTS)
def test_a_second_up_after_a_crash_completes_what_the_first_began(
        namespaces: Namespaces, tmp_path: Path, point: str) -> None:
    ns = namespaces.name()
    crash_up(tmp_path, ns, point)
    if point == "host.nft.created":
        status = browservm("host", "status", state=tmp_path, netns=ns)
        assert status.returncode == 1 and "installation was interrupted" in status.stdout, status.stdout

    second = browservm("host", "up", "--json", state=tmp_path, netns=ns)
    assert second.returncode == 0, second.stderr
    actions = {c["piece"]: c["action"] for c in json.loads(second.stdout)["changes"]}
    pieces = (f"netns {ns}", "sysctl net.ipv4.ip_forward", "bridge br0", "address 192.168.100.1/24 on br0",
              "routing rule br0", "nftables tables inet+bridge browservm")
    assert actions == dict(zip(pieces, SECOND_UP[point], strict=True))

    status = browservm("host", "status", "--json", state=tmp_path, netns=ns)
    assert status.returncode == 0, status.stdout
    # What the crashed run skipped is done now: loopback up in the namespace it made, the bridge labelled.
    lo, = json.loads(run("ip", "-j", "link", "show", "lo", netns=ns).stdout)
    assert "UP" in lo["flags"]
    bridge, = json.loads(run("ip", "-j", "-d", "link", "show", "br0", netns=ns).stdout)
    assert bridge.get("ifalias") == "browservm bridge"

    third = browservm("host", "up", "--json", state=tmp_path, netns=ns)
    assert {c["action"] for c in json.loads(third.stdout)["changes"]} == {"unchanged"}
    # Every piece is known as browservm's, whichever run created it.
    assert down(tmp_path, ns) == {**dict.fromkeys(pieces, "removed"), "sysctl net.ipv4.ip_forward": "updated"}
    assert not NetworkNamespace(ns).exists()


def test_down_reports_a_recorded_object_that_was_never_created(namespaces: Namespaces, tmp_path: Path) -> None:
    """`up` records each object before creating it: a crash in between leaves a record and no object."""
    ns = namespaces.create()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
    with store.transaction() as db:  # as if the crash came between the record and the creation
        db.execute("INSERT INTO host_objects (kind, name, detail, created_at) VALUES "
                   "('bridge', 'br9', '', 0), ('address', 'br9 192.168.9.1/24', '', 0)")
    actions = down(tmp_path, ns)
    assert actions["bridge br9"] == "unchanged" and actions["address 192.168.9.1/24 on br9"] == "unchanged"
    assert actions["bridge br0"] == "removed" and actions["address 192.168.100.1/24 on br0"] == "removed"
    nothing_of_browservm_in(ns)
    assert store.read("SELECT kind, name FROM host_objects") == []


def test_remove_tap_deletes_its_vms_half_made_tap_and_nothing_of_anyone_else(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, plan)
    with HostNetwork(plan, store, NetworkNamespace(ns)) as network:
        network.up()
        lease = ipam.lease("vm-a")
        with network.netns.entered():  # the TUN ioctls act in the calling thread's namespace
            create_tap(lease.tap, 0, 0, netns=ns)  # as a crash before attaching it leaves it: no alias
        assert network.owned_taps() == {lease.tap: "vm-a"}
        problems = {c.piece: c.detail for c in network.status() if not c.ok}
        assert "half made" in problems[f"tap {lease.tap}"]
        assert network.remove_tap("vm-a")
        assert not network.remove_tap("vm-a")  # idempotent
        assert run("ip", "-o", "link", "show", "type", "tun", netns=ns).stdout == ""

        others = {"vm-b": "browservm vm=vm-b owner=0ther000",  # another controller's VM of the same id
                  "vm-c": f"browservm vm=vm-x owner={network.owner}",  # another VM of ours
                  "vm-d": "someone's"}
        for vm_id, alias in others.items():
            tap = names_for(vm_id).tap
            run("ip", "tuntap", "add", tap, "mode", "tap", netns=ns)
            run("ip", "link", "set", tap, "alias", alias, netns=ns)
        veth = names_for("vm-e").tap  # our VM's name, no alias, but not a TAP: not something add_tap makes
        run("ip", "link", "add", veth, "type", "veth", "peer", "name", "peer-e", netns=ns)
        for vm_id in [*others, "vm-e"]:
            with pytest.raises(HostNetworkError, match=f"not VM {vm_id}"):
                network.remove_tap(vm_id)
            assert names_for(vm_id).tap in run("ip", "-br", "link", netns=ns).stdout
        assert network.owned_taps() == {names_for("vm-c").tap: "vm-x"}
        network.down(force=True)


ADD_TAP = """
import sys
from ipaddress import IPv4Network
from pathlib import Path
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store
plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
store = Store(Path(sys.argv[1]))
with HostNetwork(plan, store, NetworkNamespace(sys.argv[2])) as network:
    network.add_tap(Ipam(store, plan).lease(sys.argv[3]))
"""


def test_a_crash_between_creating_and_attaching_a_tap_leaves_nothing_host_down_cannot_remove(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create()  # kept by `down`, so it cannot take a leftover TAP with it
    up = browservm("host", "up", state=tmp_path, netns=ns)
    assert up.returncode == 0, up.stderr
    env = {**os.environ, CRASH_AT: "net.tap.created"}
    crashed = subprocess.run([sys.executable, "-c", ADD_TAP, str(tmp_path / "state.sqlite3"), ns, "vm-a"],
                             capture_output=True, text=True, timeout=60, check=False, env=env)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    tap = names_for("vm-a").tap
    link, = json.loads(run("ip", "-j", "link", "show", tap, netns=ns).stdout)
    assert "ifalias" not in link and "master" not in link  # half made

    refused = browservm("host", "down", state=tmp_path, netns=ns)
    assert refused.returncode == 1 and "vm-a" in refused.stderr
    actions = down(tmp_path, ns, "--force")
    assert actions[f"tap {tap}"] == "removed"
    assert run("ip", "-o", "link", "show", "type", "tun", netns=ns).stdout == ""
    nothing_of_browservm_in(ns)
