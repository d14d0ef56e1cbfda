"""`browservm doctor` against a stand-in guest: each fault broken alone, named by hop and cause code.

The stand-in is a namespace behind a veth attached to the bridge as a TAP is (the way
test_isolation.py makes guests), with the VM's MAC and address, a record in the store, a console
file with the markers a guest prints, and a desktop on :6080 that the test controls: websockify
with x11vnc behind it (upgrade, then "RFB 003.008"), websockify without x11vnc (upgrade, then a
close frame before any RFB byte: what websockify does when it cannot reach x11vnc), or nothing
(TCP refused). The in-guest faults ("websockify stopped", "x11vnc stopped") are tested here in
milliseconds, and against real guests in test_doctor_vm.py (booted from test-only copies of the
image). Its "VMM" is a sleeping process (the doctor is given a VmmInspector for it).

Every run must finish within 5 s; a snapshot of the controller namespace (links, addresses,
routes, neighbours, nft ruleset, sysctls) is the same before and after a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from websockets.utils import accept_key

from browservm.doctor import Doctor, Report, Sources
from browservm.doctor.report import OK, SKIPPED
from browservm.doctor.vmmview import VmmView
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm import process
from browservm.vmm.process import VmmProcess

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

BUDGET_S = 5.0
VM_ID = "vm-standin0001"


class Desktop:
    """The guest's :6080, as the test wants it: "rfb" (healthy), "no-vnc" (x11vnc stopped) or off."""

    def __init__(self, netns: str, address: str) -> None:
        self._netns, self._address = netns, address
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.mode = "rfb"

    def start(self, mode: str = "rfb") -> None:
        self.stop()
        self.mode = mode
        with NetworkNamespace(self._netns).entered():
            server = socket.create_server((self._address, 6080))
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._serve, args=(server,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            assert self._thread is not None
            self._thread.join(5)
            self._server = self._thread = None

    def _serve(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with client:
                client.settimeout(2)
                with contextlib.suppress(OSError):
                    self._answer(client)

    def _answer(self, client: socket.socket) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = client.recv(4096)
            if not chunk:
                return
            request += chunk
        headers = dict(line.split(": ", 1) for line in request.decode().split("\r\n")[1:] if ": " in line)
        key = next(v for k, v in headers.items() if k.lower() == "sec-websocket-key")
        client.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Accept: {accept_key(key)}\r\nSec-WebSocket-Protocol: binary\r\n\r\n").encode())
        if self.mode == "rfb":
            client.sendall(b"\x82\x0cRFB 003.008\n")
            client.recv(1)  # until the doctor hangs up (the socket's timeout bounds it)
        else:  # websockify could not reach x11vnc: it closes the WebSocket before any RFB byte
            reason = b"Failed to connect to downstream server"
            client.sendall(bytes([0x88, 2 + len(reason)]) + (1011).to_bytes(2, "big") + reason)


@dataclass
class StandInVmm:
    """The stand-in's "VMM": a sleeping process, and the configuration a VMM would have been given."""

    vmm: VmmProcess
    view_of: VmmView

    def alive(self, record: VmRecord) -> bool:
        return process.alive(self.vmm)

    def view(self, record: VmRecord) -> VmmView:
        return self.view_of


@dataclass
class Lab:
    ctl: str
    guest: str
    network: HostNetwork
    records: VmRecords
    lease: Lease
    desktop: Desktop
    vmm: StandInVmm
    sleeper: subprocess.Popen[bytes]
    directory: Path
    timings: dict[str, float] = field(default_factory=dict)

    def doctor(self) -> Doctor:
        records = self.records

        async def record(vm_id: str) -> VmRecord | None:
            return await asyncio.to_thread(records.get, vm_id)

        async def every() -> list[VmRecord]:
            return await asyncio.to_thread(records.all)

        return Doctor(Sources(plan=self.network.plan, netns=self.network.netns, vmm_choice="qemu", kernel=None,
                              rootfs=None, status=self.network.status, record=record, records=every,
                              vmms=self.vmm, expected=self.network.expected))

    def diagnose(self, case: str = "") -> Report:
        started = time.monotonic()
        report = asyncio.run(self.doctor().vm(VM_ID))
        elapsed = time.monotonic() - started
        self.timings[case] = elapsed
        assert elapsed < BUDGET_S, f"{case}: the doctor took {elapsed:.2f} s"
        return report

    def attach(self) -> None:
        attach_link = getattr(self.network, "attach_link", None)
        if attach_link is not None:
            attach_link(self.lease)
            return
        # Without attach_link (an older hostnet): the steps add_tap's attach_port makes.
        tap = self.lease.tap
        run("ip", "link", "set", tap, "master", self.lease.bridge, netns=self.ctl)
        run("bridge", "link", "set", "dev", tap, "isolated", "on", netns=self.ctl)
        run("ip", "link", "set", tap, "alias", f"browservm vm={VM_ID} owner={self.network.owner}", "up",
            netns=self.ctl)


CONSOLE = """[    0.000000] Linux version 6.1.0 (stand-in)
[    0.612000] IP-Config: Complete:
[    0.612001]      device=eth0, hwaddr={mac}, ipaddr={ip}, mask=255.255.255.0, gw={gateway}
[    3.100000] browservm-net: status=ok device=eth0 address={address} gateway={gateway} by=kernel
[   20.000000] browservm-ready: service=x11vnc state=ready port=5901
[   21.000000] browservm-ready: service=websockify state=ready port=6080
[   22.000000] browservm-ready: service=desktop state=ready services=xvfb,openbox,x11vnc,websockify
"""


@pytest.fixture
def lab(namespaces: Namespaces, tmp_path: Path) -> Iterator[Lab]:
    with stand_in(namespaces, tmp_path) as made:
        yield made


@contextlib.contextmanager
def stand_in(namespaces: Namespaces, tmp_path: Path) -> Iterator[Lab]:
    """A controller namespace with browservm's host network and one healthy stand-in guest on it."""
    ctl, guest = namespaces.name("ctl"), namespaces.create("guest")
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    store = Store(tmp_path / "state.sqlite3")
    sleeper = subprocess.Popen(["sleep", "600"])
    with HostNetwork(plan, store, NetworkNamespace(ctl)) as network:
        try:
            network.up()
            lease = Ipam(store, plan).lease(VM_ID)
            run("ip", "link", "add", lease.tap, "type", "veth", "peer", "name", "eth0", "netns", guest, netns=ctl)
            run("ip", "link", "set", "eth0", "address", lease.mac, netns=guest)
            run("ip", "addr", "add", str(lease.address), "dev", "eth0", netns=guest)
            run("ip", "link", "set", "eth0", "up", netns=guest)
            run("ip", "link", "set", "lo", "up", netns=guest)
            directory = tmp_path / "vms" / VM_ID
            directory.mkdir(parents=True)
            (directory / "console.log").write_text(CONSOLE.format(
                mac=lease.mac, ip=lease.address.ip, address=lease.address, gateway=lease.gateway))
            start = process.start_time(sleeper.pid)
            assert start is not None
            records = VmRecords(store)
            records.insert(VmRecord(vm_id=VM_ID, user="u", vcpus=1, mem_mib=256, directory=str(directory),
                                    state=VmState.READY, driver="qemu", pid=sleeper.pid, pid_start_time=start,
                                    address=str(lease.address), gateway=str(lease.gateway), tap=lease.tap,
                                    mac=lease.mac, bridge=lease.bridge), max_total=10, max_per_user=10)
            boot_args = (f"console=ttyS0 ip={lease.address.ip}::{lease.gateway}:{lease.address.netmask}:{VM_ID}:"
                         "eth0:off")
            vmm = StandInVmm(VmmProcess(sleeper.pid, start),
                             VmmView("stand-in", lease.tap, lease.tap, lease.mac, boot_args, None, None))
            desktop = Desktop(guest, str(lease.address.ip))
            lab = Lab(ctl, guest, network, records, lease, desktop, vmm, sleeper, directory)
            lab.attach()
            desktop.start("rfb")
            try:
                yield lab
            finally:
                desktop.stop()
        finally:
            sleeper.kill()
            sleeper.wait()
            network.down(force=True)


def _hop_statuses(report: Report) -> dict[str, str]:
    return {hop.hop: hop.status for hop in report.hops}


def test_a_healthy_stand_in_is_ok_on_every_hop_each_saying_what_it_checked(lab: Lab) -> None:
    report = lab.diagnose("healthy")
    assert report.verdict == "OK", report.to_json()
    for hop in report.hops:
        assert hop.status == OK and hop.checked, hop
    document = report.to_json()
    assert document["hop"] is None and document["cause"] is None
    assert [h["hop"] for h in document["hops"]][-9:] == [
        "vmm.spawn", "net.tap", "guest.network", "net.arp", "desktop.ready", "net.tcp", "ws.upgrade", "rfb.banner",
        "desktop.complete"]
    assert all(isinstance(h["seconds"], float) for h in document["hops"])


def _set_mac(lab: Lab, mac: str) -> None:
    record = lab.records.get(VM_ID)
    assert record is not None
    record.mac = mac
    lab.records.save(record)


def _drop_rule(lab: Lab) -> None:
    script = ("add table inet intruder\n"
              "add chain inet intruder input { type filter hook input priority -10; }\n"
              "add rule inet intruder input tcp sport 6080 drop\n")
    subprocess.run(["ip", "netns", "exec", lab.ctl, "nft", "-f", "-"], input=script, text=True, check=True)


def _kill(sleeper: subprocess.Popen[bytes]) -> None:
    sleeper.kill()
    sleeper.wait()


def _set_forwarding(lab: Lab, value: str) -> None:
    with NetworkNamespace(lab.ctl).entered():
        Path("/proc/sys/net/ipv4/ip_forward").write_text(value + "\n")


def _on_bridge(*argv: str) -> Callable[[Lab], None]:
    """Run `ip argv` on the bridge, then put back the VM's pinned neighbour entry as the doctor's evidence says:
    a link going down, or losing its last address, loses its neighbour entries, permanent ones too
    (test_doctor_props.py checks that the doctor names that)."""
    def restore(lab: Lab) -> None:
        run("ip", *argv, netns=lab.ctl)
        run("ip", "neigh", "replace", str(lab.lease.address.ip), "lladdr", lab.lease.mac, "dev", "br0", "nud",
            "permanent", netns=lab.ctl)
    return restore


Fault = tuple[str, str, str, Callable[[Lab], object], Callable[[Lab], object]]
GATEWAY = "192.168.100.1/24"
FAULTS: list[Fault] = [
    ("bridge-down", "host.bridge", "bridge.down",
     lambda lab: run("ip", "link", "set", "br0", "down", netns=lab.ctl), _on_bridge("link", "set", "br0", "up")),
    ("bridge-address-removed", "host.bridge", "bridge.no_address",
     lambda lab: run("ip", "addr", "del", GATEWAY, "dev", "br0", netns=lab.ctl),
     _on_bridge("addr", "add", GATEWAY, "dev", "br0")),
    ("tap-detached", "net.tap", "tap.detached",
     lambda lab: run("ip", "link", "set", lab.lease.tap, "nomaster", netns=lab.ctl),
     lambda lab: lab.attach()),
    ("tap-down", "net.tap", "tap.down",
     lambda lab: run("ip", "link", "set", lab.lease.tap, "down", netns=lab.ctl),
     lambda lab: run("ip", "link", "set", lab.lease.tap, "up", netns=lab.ctl)),
    ("forwarding-off", "host.forwarding", "forwarding.off",
     lambda lab: _set_forwarding(lab, "0"), lambda lab: _set_forwarding(lab, "1")),
    ("nft-table-deleted", "host.firewall", "nft.table_missing",
     lambda lab: run("nft", "delete", "table", "inet", "browservm", netns=lab.ctl),
     lambda lab: lab.network.up()),
    ("drop-6080-before-ours", "net.tcp", "firewall.foreign_drop",
     _drop_rule, lambda lab: run("nft", "delete", "table", "inet", "intruder", netns=lab.ctl)),
    ("recorded-mac-differs", "vmm.spawn", "mac.mismatch",
     lambda lab: _set_mac(lab, "02:fc:00:00:00:01"), lambda lab: _set_mac(lab, lab.lease.mac)),
    ("websockify-stopped", "net.tcp", "desktop.port_closed",
     lambda lab: lab.desktop.stop(), lambda lab: lab.desktop.start("rfb")),
    ("x11vnc-stopped", "rfb.banner", "vnc.unreachable",
     lambda lab: lab.desktop.start("no-vnc"), lambda lab: lab.desktop.start("rfb")),
    # These two do not come back: last.
    ("tap-deleted", "net.tap", "tap.missing",
     lambda lab: run("ip", "link", "del", lab.lease.tap, netns=lab.ctl), lambda lab: None),
    ("vmm-killed", "vmm.spawn", "vmm.dead",
     lambda lab: _kill(lab.sleeper), lambda lab: None),
]


def test_each_fault_alone_is_named_by_hop_and_cause_and_the_stand_in_comes_back_healthy(lab: Lab) -> None:
    for name, hop, cause, breaks, restores in FAULTS:
        breaks(lab)
        try:
            report = lab.diagnose(name)
        finally:
            restores(lab)
        document = report.to_json()
        assert (document["verdict"], document["hop"], document["cause"]) == ("FAIL", hop, cause), \
            (name, json.dumps(document, indent=1))
        assert document["summary"].startswith(f"FAIL {hop}: ")
        assert document["fix"], name
        statuses = _hop_statuses(report)
        names = list(statuses)
        if hop in names[names.index("vmm.spawn"):]:  # a VM hop: the walk stopped there
            assert all(statuses[later] == SKIPPED for later in names[names.index(hop) + 1:]), (name, statuses)
        if name not in ("tap-deleted", "vmm-killed"):
            healthy = lab.diagnose(f"{name}: restored")
            assert healthy.verdict == "OK", (name, healthy.to_json())
    print("\n" + "\n".join(f"{case:<40} {seconds * 1000:7.1f} ms" for case, seconds in lab.timings.items()))


def _ipv6_settled(netns: str) -> None:
    """Until every link that is up has its IPv6 link-local address and none is still tentative (DAD)."""
    deadline = time.monotonic() + 10
    while True:
        links = json.loads(run("ip", "-j", "-6", "addr", "show", "up", netns=netns).stdout or "[]")
        addresses = [a for link in links if link.get("ifname") != "lo" for a in link.get("addr_info", [])]
        settled = all(any(a.get("scope") == "link" for a in link.get("addr_info", []))
                      for link in links if link.get("ifname") != "lo")
        if settled and not any(a.get("tentative") for a in addresses):
            return
        assert time.monotonic() < deadline, f"IPv6 addresses in {netns} did not settle: {links}"
        time.sleep(0.05)


def _snapshot(netns: str) -> dict[str, Any]:
    def ip_json(*args: str) -> Any:
        return json.loads(run("ip", "-j", *args, netns=netns).stdout or "[]")

    def without(value: Any, volatile: set[str]) -> Any:
        if isinstance(value, dict):
            if "counter" in value and len(value) == 1:
                return {"counter": None}  # packet counts move with any traffic
            return {k: without(v, volatile) for k, v in value.items() if k not in volatile}
        if isinstance(value, list):
            return [without(v, volatile) for v in value]
        return value

    volatile = {"stats64", "operstate", "linkmode", "valid_life_time", "preferred_life_time", "expires", "handle",
                "state", "used", "probes"}
    sysctls = {}
    with NetworkNamespace(netns).entered():
        for key in ("net/ipv4/ip_forward", "net/ipv4/conf/all/forwarding", "net/ipv4/conf/br0/arp_ignore",
                    "net/bridge/bridge-nf-call-iptables", "net/bridge/bridge-nf-call-arptables"):
            with contextlib.suppress(FileNotFoundError):
                sysctls[key] = Path("/proc/sys", key).read_text()
    snapshot: dict[str, Any] = without({
        "links": ip_json("link", "show"), "addresses": ip_json("addr", "show"),
        "routes": ip_json("route", "show", "table", "all"), "rules": ip_json("rule", "show"),
        "neighbours": ip_json("neigh", "show"),
        "nft": json.loads(run("nft", "-j", "list", "ruleset", netns=netns).stdout)["nftables"][1:],
        "sysctls": sysctls}, volatile)
    return snapshot


def test_a_doctor_run_changes_nothing_in_the_vm_namespace(lab: Lab) -> None:
    _ipv6_settled(lab.ctl)  # else the kernel's own link-local addresses and routes land between the snapshots
    before = _snapshot(lab.ctl)
    for mode in ("rfb", "no-vnc", "off"):
        if mode == "off":
            lab.desktop.stop()
        else:
            lab.desktop.start(mode)
        lab.diagnose(f"snapshot {mode}")
        assert _snapshot(lab.ctl) == before, mode
    asyncio.run(lab.doctor().host())
    assert _snapshot(lab.ctl) == before
