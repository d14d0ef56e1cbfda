"""Every property `host up` and `vm create` set, changed by hand, is named by the doctor and by
`host status`: the property, the value browservm set and the value found, under the right hop.

Real kernel objects in a namespace the test creates: the host network of `host up`, and one VM's
port made by `HostNetwork.add_tap` (a real TAP, owned by the VMM's user) with no guest behind it;
its "VMM" is a stand-in the doctor is given, so the walk's vmm.spawn passes and net.tap is judged.
Each case changes one property with ip, bridge, nft or /proc/sys inside the namespace, runs the
doctor, checks what it names, puts the property back (as the doctor's evidence says, or with
`host up`) and checks that the hop is clean again. Where `host up` is the fix, this also shows it
repairs what it set.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.doctor import Doctor, Report, Sources
from browservm.doctor.report import OK
from browservm.doctor.vmmview import VmmView
from browservm.hostnet.host import FIREWALL, HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm import process

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

VM_ID = "vm-props0001"
VMM_USER = (1000, 1000)
HOST_HOPS = ("host.netns", "host.bridge", "host.forwarding", "host.firewall")


class StandInVmm:
    """The port's "VMM": alive, and configured as the record says (nothing boots behind the TAP)."""

    def __init__(self, view: VmmView) -> None:
        self._view = view

    def alive(self, record: VmRecord) -> bool:
        return True

    def view(self, record: VmRecord) -> VmmView:
        return self._view


@dataclass
class Port:
    ns: str
    network: HostNetwork
    lease: Lease
    records: VmRecords
    vmm: StandInVmm

    def diagnose(self) -> Report:
        records = self.records

        async def record(vm_id: str) -> VmRecord | None:
            return await asyncio.to_thread(records.get, vm_id)

        async def every() -> list[VmRecord]:
            return await asyncio.to_thread(records.all)

        doctor = Doctor(Sources(plan=self.network.plan, netns=self.network.netns, vmm_choice="qemu", kernel=None,
                                rootfs=None, status=self.network.status, record=record, records=every,
                                vmms=self.vmm, expected=self.network.expected))
        return asyncio.run(doctor.vm(VM_ID))

    # Each step returns the port, so that steps chain: port.ip(...).up().recreate()

    def ip(self, *argv: str) -> Port:
        run(*argv, netns=self.ns)
        return self

    def nft(self, script: str) -> Port:
        run("nft", script, netns=self.ns)
        return self

    def up(self) -> Port:
        """`host up`: puts back what it set."""
        self.network.up()
        return self

    def recreate(self) -> Port:
        """`vm rm` and create again, for the port: every property as `add_tap` sets it."""
        assert self.network.remove_tap(VM_ID)
        self.network.add_tap(self.lease)
        return self


@pytest.fixture
def port(namespaces: Namespaces, tmp_path: Path) -> Iterator[Port]:
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    ns = namespaces.name("ctl")
    with HostNetwork(plan, store, NetworkNamespace(ns), tap_owner=VMM_USER) as network:
        try:
            network.up()
            lease = Ipam(store, plan).lease(VM_ID)
            network.add_tap(lease)
            start = process.start_time(os.getpid())
            assert start is not None
            records = VmRecords(store)
            records.insert(VmRecord(vm_id=VM_ID, user="u", vcpus=1, mem_mib=256, directory=str(tmp_path),
                                    state=VmState.READY, driver="qemu", pid=os.getpid(), pid_start_time=start,
                                    address=str(lease.address), gateway=str(lease.gateway), tap=lease.tap,
                                    mac=lease.mac, bridge=lease.bridge), max_total=10, max_per_user=10)
            boot_args = f"ip={lease.address.ip}::{lease.gateway}:{lease.address.netmask}:{VM_ID}:eth0:off"
            vmm = StandInVmm(VmmView("stand-in", lease.tap, lease.tap, lease.mac, boot_args, None, None))
            yield Port(ns, network, lease, records, vmm)
        finally:
            network.down(force=True)


def _set_tap_owner(port: Port, uid: int, gid: int) -> None:
    """What no `ip` command does to an existing TAP: attach to it and set another owner."""
    flags = 0x0002 | 0x1000 | 0x4000  # IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, as create_tap made it
    with port.network.netns.entered():
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", port.lease.tap.encode(), flags))  # TUNSETIFF
            fcntl.ioctl(fd, 0x400454CC, uid)  # TUNSETOWNER
            fcntl.ioctl(fd, 0x400454CE, gid)  # TUNSETGROUP
        finally:
            os.close(fd)  # persistent: the TAP stays


def _rule_handle(port: Port, chain: str, comment: str) -> int:
    listing = json.loads(run("nft", "-j", "list", "chain", "inet", "browservm", chain, netns=port.ns).stdout)
    return next(int(o["rule"]["handle"]) for o in listing["nftables"]
                if "rule" in o and o["rule"].get("comment") == comment)


def _write_sysctl(port: Port, key: str, value: str) -> None:
    with port.network.netns.entered():
        Path("/proc/sys", key.replace(".", "/")).write_text(value + "\n")


Change = Callable[[Port], object]


@dataclass(frozen=True)
class Case:
    name: str
    hop: str
    cause: str
    said: str  # "<property>: expected <value>, found <value>", with {tap}, {mac}, {ip}, {bridge_mac} filled in
    change: Change
    restore: Change
    piece: str  # the piece `host status` names it under


TAP = "tap {tap}"
SERVICES_RULE = "browservm: VMs may not reach the host's services"
CASES = [
    # One VM's port, as `add_tap` set it: net.tap
    Case("learning on", "net.tap", "tap.changed", "bridge-port learning: expected off, found on",
         lambda p: p.ip("bridge", "link", "set", "dev", p.lease.tap, "learning", "on"),
         lambda p: p.ip("bridge", "link", "set", "dev", p.lease.tap, "learning", "off"), TAP),
    Case("isolation off", "net.tap", "tap.not_isolated", "bridge-port isolated: expected on, found off",
         lambda p: p.ip("bridge", "link", "set", "dev", p.lease.tap, "isolated", "off"),
         lambda p: p.ip("bridge", "link", "set", "dev", p.lease.tap, "isolated", "on"), TAP),
    Case("interface group", "net.tap", "tap.changed", "interface group: expected 0x62766d01, found 0x0",
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "group", "0"),
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "group", str(0x62766D01)), TAP),
    Case("alias", "net.tap", "tap.not_ours", "alias: expected 'browservm vm={vm} owner={owner}', found 'mine'",
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "alias", "mine"),
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "alias", f"browservm vm={VM_ID} owner={p.network.owner}"),
         TAP),
    Case("TAP down", "net.tap", "tap.down", "state: expected up, found down",
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "down"),
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "up"), TAP),
    Case("detached", "net.tap", "tap.detached", "master: expected br0, found none",
         lambda p: p.ip("ip", "link", "set", p.lease.tap, "nomaster"), Port.recreate, TAP),
    Case("forwarding entry gone", "net.tap", "tap.changed",
         "forwarding entry: expected {mac} static sticky, found none",
         lambda p: p.ip("bridge", "fdb", "del", p.lease.mac, "dev", p.lease.tap, "master"),
         lambda p: p.ip("bridge", "fdb", "replace", p.lease.mac, "dev", p.lease.tap, "master", "static", "sticky"),
         TAP),
    Case("forwarding entry not sticky", "net.tap", "tap.changed",
         "forwarding entry: expected {mac} static sticky, found {mac} static",
         lambda p: p.ip("bridge", "fdb", "replace", p.lease.mac, "dev", p.lease.tap, "master", "static"),
         lambda p: p.ip("bridge", "fdb", "replace", p.lease.mac, "dev", p.lease.tap, "master", "static", "sticky"),
         TAP),
    Case("neighbour not permanent", "net.tap", "tap.changed",
         "neighbour {ip} on br0: expected {mac} permanent, found {mac} noarp",
         lambda p: p.ip("ip", "neigh", "replace", str(p.lease.address.ip), "lladdr", p.lease.mac, "dev", "br0",
                        "nud", "noarp"),
         lambda p: p.ip("ip", "neigh", "replace", str(p.lease.address.ip), "lladdr", p.lease.mac, "dev", "br0",
                        "nud", "permanent"), TAP),
    Case("vm_mac element gone", "net.tap", "tap.changed", "nftables vm_mac element: expected {tap} . {mac}, found none",
         lambda p: p.nft(f'delete element bridge browservm vm_mac {{ "{p.lease.tap}" . {p.lease.mac} }}'),
         lambda p: p.nft(f'add element bridge browservm vm_mac {{ "{p.lease.tap}" . {p.lease.mac} }}'), TAP),
    Case("vm_ip4 element changed", "net.tap", "tap.changed",
         "nftables vm_ip4 element: expected {tap} . {ip}, found {tap} . 192.168.100.99",
         lambda p: p.nft(f'delete element bridge browservm vm_ip4 {{ "{p.lease.tap}" . {p.lease.address.ip} }}')
                    .nft(f'add element bridge browservm vm_ip4 {{ "{p.lease.tap}" . 192.168.100.99 }}'),
         lambda p: p.nft(f'delete element bridge browservm vm_ip4 {{ "{p.lease.tap}" . 192.168.100.99 }}')
                    .nft(f'add element bridge browservm vm_ip4 {{ "{p.lease.tap}" . {p.lease.address.ip} }}'),
         TAP),
    Case("TAP owner", "net.tap", "tap.changed", "TAP owner: expected 1000:1000, found 0:0",
         lambda p: _set_tap_owner(p, 0, 0), lambda p: _set_tap_owner(p, *VMM_USER), TAP),
    # The bridge, as `host up` set it: host.bridge
    Case("bridge MAC", "host.bridge", "bridge.changed", "MAC: expected {bridge_mac}, found 02:00:00:00:00:07",
         lambda p: p.ip("ip", "link", "set", "br0", "address", "02:00:00:00:00:07"),
         # A new MAC loses the bridge's neighbour entries, permanent ones too: the port's is made again.
         lambda p: p.ip("ip", "link", "set", "br0", "address", p.network.plan.segments[0].bridge_mac).recreate(),
         "bridge br0"),
    Case("bridge alias", "host.bridge", "bridge.changed", "alias: expected 'browservm bridge', found 'lan'",
         lambda p: p.ip("ip", "link", "set", "br0", "alias", "lan"),
         lambda p: p.ip("ip", "link", "set", "br0", "alias", "browservm bridge"), "bridge br0"),
    Case("bridge down", "host.bridge", "bridge.down", "state: expected up, found down",
         lambda p: p.ip("ip", "link", "set", "br0", "down"),
         lambda p: p.up().recreate(), "bridge br0"),  # the bridge's neighbours went with it
    Case("gateway address", "host.bridge", "bridge.no_address",
         "gateway address: expected 192.168.100.1/24, found 192.168.100.77/24",
         lambda p: p.ip("ip", "addr", "del", "192.168.100.1/24", "dev", "br0")
                    .ip("ip", "addr", "add", "192.168.100.77/24", "dev", "br0"),
         lambda p: p.ip("ip", "addr", "del", "192.168.100.77/24", "dev", "br0").up().recreate(),
         "bridge br0"),
    # The namespace: host.netns, host.forwarding, and the routing rules under host.firewall
    Case("lo down", "host.netns", "netns.changed", "lo: expected up, found down",
         lambda p: p.ip("ip", "link", "set", "lo", "down"), Port.up, "netns {ns}"),
    Case("forwarding off", "host.forwarding", "forwarding.off", "value: expected 1, found 0",
         lambda p: _write_sysctl(p, "net.ipv4.ip_forward", "0"), Port.up,
         "sysctl net.ipv4.ip_forward"),
    Case("IPv4 routing rule gone", "host.firewall", "routing_rule.missing",
         "ipv4 pref 100: expected iif br0 fwmark 0x0/0x100000 prohibit, found absent",
         lambda p: p.ip("ip", "-4", "rule", "del", "pref", "100"), Port.up, "routing rule br0"),
    Case("IPv6 routing rule changed", "host.firewall", "routing_rule.missing",
         "ipv6 pref 100: expected iif br0 fwmark 0x0/0x100000 prohibit, found iif br0 fwmark 0x0/0x100000 blackhole",
         lambda p: p.ip("ip", "-6", "rule", "del", "pref", "100")
                    .ip("ip", "-6", "rule", "add", "pref", "100", "iif", "br0", "fwmark", "0/0x100000", "blackhole"),
         lambda p: p.ip("ip", "-6", "rule", "del", "pref", "100").up(), "routing rule br0"),
    Case("local table first again", "host.firewall", "routing_rule.changed",
         "ipv4 local table lookup: expected pref 1000, found pref 0, pref 1000",
         lambda p: p.ip("ip", "-4", "rule", "add", "pref", "0", "lookup", "local"), Port.up,
         "routing rule local"),
    # browservm's nftables tables, against what `host up` installed: host.firewall
    Case("chain policy", "host.firewall", "nft.table_changed",
         "chain inet browservm input: expected type filter hook input priority 0 policy accept, "
         "found type filter hook input priority 0 policy drop",
         lambda p: p.nft("chain inet browservm input { policy drop; }"), Port.up, FIREWALL),
    Case("rule added", "host.firewall", "nft.table_changed",
         "rule inet browservm input 'accept': expected absent, found accept",
         lambda p: p.nft("add rule inet browservm input accept"), Port.up, FIREWALL),
    Case("rule deleted", "host.firewall", "nft.table_changed",
         "rule inet browservm input \"browservm: VMs may not reach the host's services\": expected "
         "iifname br0 drop, found absent",
         lambda p: p.nft("delete rule inet browservm input handle "
                         f"{_rule_handle(p, 'input', SERVICES_RULE)}"),
         Port.up, FIREWALL),
]


def _said(case: Case, port: Port, text: str) -> str:
    segment = port.network.plan.segments[0]
    return text.format(tap=port.lease.tap, mac=port.lease.mac, ip=port.lease.address.ip, vm=VM_ID,
                       owner=port.network.owner, bridge_mac=segment.bridge_mac, ns=port.ns)


def _clean(report: Report) -> None:
    for name in (*HOST_HOPS, "vmm.spawn", "net.tap"):
        hop = report.hop(name)
        assert hop.status == OK, (name, hop.to_json())


def test_a_clean_port_and_host_are_ok_on_every_property(port: Port) -> None:
    report = port.diagnose()
    _clean(report)
    checked = " ".join(port.diagnose().hop("net.tap").checked)
    for name in ("master", "state", "alias", "interface group", "bridge-port isolated", "bridge-port learning",
                 "forwarding entry", "neighbour", "vm_mac element", "vm_ip4 element", "TAP owner"):
        assert name in checked, name
    assert all(check.ok for check in port.network.status()), port.network.status()


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_property_changed_by_hand_is_named_with_expected_and_found(port: Port, case: Case) -> None:
    said = _said(case, port, case.said)
    case.change(port)
    report = port.diagnose()
    hop = report.hop(case.hop)
    causes = [hop.cause, *(line.split(":")[1].strip() for line in hop.evidence if line.startswith("also: "))]
    assert case.cause in causes, (case.name, hop.to_json())
    assert any(said in line for line in hop.evidence), (case.name, said, hop.evidence)
    assert any(line.strip().startswith("put it back: ") for line in hop.evidence), hop.evidence
    status = {check.piece: check for check in port.network.status()}
    piece = status[_said(case, port, case.piece)]
    assert not piece.ok and said in piece.detail, (case.name, said, piece)

    case.restore(port)
    _clean(port.diagnose())
    assert all(check.ok for check in port.network.status()), (case.name, port.network.status())
