"""Per-VM network setup and teardown: browservm (netlink) against `ip` subprocesses.

Run as root: python3 bench/hostnet_bench.py [--counts 50,200,1000] [--baseline-count 200]

Everything happens in a network namespace this script creates and deletes.
Setup is lease + TAP create + attach to the bridge + up (+ port isolation);
teardown is TAP delete + lease release. The baseline does the same TAP work
with `ip tuntap add` / `ip link set` subprocesses (and the same lease), in the
same run, so the ratio does not depend on the machine.
Targets (issue 2): median setup <= 5 ms per VM, >= 10x faster than the
baseline, flat per-VM cost as the count grows.

Anti-spoofing (issue 10): the same VMs with and without the per-port rules
("without" is the port alone: no group, FDB and neighbour pins, no set
elements), and the bridged TCP throughput from a stand-in guest to the host
with the per-port rules (table bridge browservm) against without them (the
inet table stays), alternating in the same run.
Targets: per-VM setup <= 2 ms median and flat; throughput >= 95% of without.

A flushed ruleset: how long from another program's `nft flush ruleset` to our tables back, with the
check woken by the kernel's notification (the service's way, hostnet/watch.py) against the 2 s timer it
replaced, run in the same namespace in the same run (the timer flushed at random points of its period).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from ipaddress import IPv4Network
from pathlib import Path

from browservm.hostnet.host import HostNetwork
from browservm.hostnet.links import attach_port, create_tap
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.rtnl import RtnlSocket
from browservm.hostnet.watch import RulesetWatch
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Baseline:
    """The same per-VM work with one `ip` subprocess per step."""

    def __init__(self, ipam: Ipam, ns: NetworkNamespace) -> None:
        self._ipam = ipam
        self._ns = ns

    def setup(self, vm_id: str) -> Lease:
        lease = self._ipam.lease(vm_id)
        with self._ns.entered():
            _ip("tuntap", "add", lease.tap, "mode", "tap", "user", "0", "group", "0", "vnet_hdr")
            _ip("link", "set", lease.tap, "master", lease.bridge, "up", "alias", f"browservm vm={vm_id}")
            _ip("link", "set", lease.tap, "type", "bridge_slave", "isolated", "on")
        return lease

    def teardown(self, lease: Lease) -> None:
        with self._ns.entered():
            _ip("link", "del", lease.tap)
        self._ipam.release(lease.vm_id)


class Browservm:
    def __init__(self, ipam: Ipam, network: HostNetwork) -> None:
        self._ipam = ipam
        self._network = network

    def setup(self, vm_id: str) -> Lease:
        lease = self._ipam.lease(vm_id)
        self._network.add_tap(lease)
        return lease

    def teardown(self, lease: Lease) -> None:
        self._network.remove_tap(lease.vm_id)
        self._ipam.release(lease.vm_id)


class PortOnly:
    """The per-VM path without anti-spoofing: the TAP as an up, isolated, labelled port, nothing else."""

    def __init__(self, ipam: Ipam, ns: NetworkNamespace) -> None:
        self._ipam = ipam
        self._ns = ns

    def setup(self, vm_id: str) -> Lease:
        lease = self._ipam.lease(vm_id)
        with self._ns.entered():
            index = create_tap(lease.tap, 0, 0, netns=self._ns.name)
            rtnl = RtnlSocket()
            try:
                attach_port(rtnl, index, lease.tap, lease.bridge, f"browservm vm={vm_id}", netns=self._ns.name)
            finally:
                rtnl.close()
        return lease

    def teardown(self, lease: Lease) -> None:
        with self._ns.entered():
            rtnl = RtnlSocket()
            try:
                rtnl.delete_link(socket.if_nametoindex(lease.tap))
            finally:
                rtnl.close()
        self._ipam.release(lease.vm_id)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(count: int, use_netlink: bool, subnet: str, antispoof: bool = True) -> tuple[list[float], list[float]]:
    """Set up and tear down `count` VMs in a fresh namespace; per-VM times in ms."""
    ns = NetworkNamespace(f"bvbench-{os.getpid()}")
    plan = NetworkPlan.build(IPv4Network(subnet), "br0")
    with tempfile.TemporaryDirectory() as state, Store(Path(state) / "state.sqlite3") as store, \
            HostNetwork(plan, store, ns) as network:
        ipam = Ipam(store, plan)
        runner: Browservm | Baseline | PortOnly
        if not use_netlink:
            runner = Baseline(ipam, ns)
        else:
            runner = Browservm(ipam, network) if antispoof else PortOnly(ipam, ns)
        try:
            network.up()
            setup, teardown, leases = [], [], []
            for i in range(count):
                start = time.perf_counter()
                leases.append(runner.setup(f"vm-{i}"))
                setup.append((time.perf_counter() - start) * 1000)
            for lease in leases:
                start = time.perf_counter()
                runner.teardown(lease)
                teardown.append((time.perf_counter() - start) * 1000)
            network.down(force=True)
        finally:
            network.close()
            ns.delete()
    return setup, teardown


def _row(label: str, setup: list[float], teardown: list[float]) -> str:
    return (f"{label:<28} setup median {statistics.median(setup):7.2f} ms  p95 {_percentile(setup, 0.95):7.2f} ms"
            f"   teardown median {statistics.median(teardown):7.2f} ms  p95 {_percentile(teardown, 0.95):7.2f} ms")


THROUGHPUT_PORT = 5201  # a guest port: VMs may open connections to it on the gateway


def _ip_in(ns: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "ip", *args], check=True, capture_output=True)


def _throughput(ns: NetworkNamespace, guest: str, address: str, seconds: float) -> float:
    """MB/s of one TCP stream from the stand-in guest to the host, across the bridge."""
    with ns.entered():
        server = socket.create_server(("192.168.100.1", THROUGHPUT_PORT))
    port = THROUGHPUT_PORT
    received = [0]

    def sink() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(1 << 20):
                received[0] += len(data)
    reader = threading.Thread(target=sink)
    reader.start()
    with NetworkNamespace(guest).entered():
        client = socket.create_connection(("192.168.100.1", port))
    chunk = b"\0" * (1 << 20)
    start = time.perf_counter()
    with client:
        while time.perf_counter() - start < seconds:
            client.sendall(chunk)
    reader.join()
    elapsed = time.perf_counter() - start
    server.close()
    return received[0] / elapsed / 1e6


def throughput(rounds: int, seconds: float) -> tuple[list[float], list[float]]:
    """Guest-to-host MB/s with the per-port rules (table bridge browservm) and without, alternating."""
    ns = NetworkNamespace(f"bvbench-{os.getpid()}")
    guest = f"bvbench-{os.getpid()}-guest"
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", guest_ports=(THROUGHPUT_PORT,))
    with_rules, without = [], []
    with tempfile.TemporaryDirectory() as state, Store(Path(state) / "state.sqlite3") as store, \
            HostNetwork(plan, store, ns) as network:
        try:
            network.up()
            lease = Ipam(store, plan).lease("vm-bench")
            subprocess.run(["ip", "netns", "add", guest], check=True)
            _ip_in(ns.name or "", "link", "add", lease.tap, "type", "veth", "peer", "name", "eth0", "netns", guest)
            _ip_in(guest, "link", "set", "eth0", "address", lease.mac, "up")
            _ip_in(guest, "addr", "add", str(lease.address), "dev", "eth0")
            network.attach_link(lease)
            # Without the bridge table the guest's ARP is not marked as checked and the host would not answer
            # it (rules.py): the guest knows the gateway's MAC for good instead.
            gateway_mac = json.loads(subprocess.run(["ip", "netns", "exec", ns.name or "", "ip", "-j", "link", "show",
                                                     "br0"], check=True, capture_output=True).stdout)[0]["address"]
            _ip_in(guest, "neigh", "replace", "192.168.100.1", "lladdr", gateway_mac, "dev", "eth0", "nud", "permanent")
            for _ in range(rounds):
                network.up()  # the tables, with the guest's elements
                with_rules.append(_throughput(ns, guest, str(lease.address.ip), seconds))
                with ns.entered():  # the per-port rules only: the inet table (NAT, egress, conntrack) stays
                    subprocess.run(["nft", "delete", "table", "bridge", "browservm"], check=True)
                without.append(_throughput(ns, guest, str(lease.address.ip), seconds))
            network.up()
            network.remove_tap("vm-bench")
            network.down(force=True)
        finally:
            network.close()
            subprocess.run(["ip", "netns", "del", guest], check=False, capture_output=True)
            ns.delete()
    return with_rules, without


OLD_TIMER_S = 2.0  # the drift check's period before it was woken by notifications


def _flush(ns: NetworkNamespace) -> float:
    """Flush the namespace's ruleset as another program would; when the flush was committed."""
    subprocess.run(["ip", "netns", "exec", ns.name or "", "nft", "flush", "ruleset"], check=True)
    return time.perf_counter()


def _next_change(watch: RulesetWatch) -> float:
    if not asyncio.run(watch.changed(30)):
        raise SystemExit("no notification within 30 s")
    return time.perf_counter()


def drift_window(rounds: int) -> tuple[list[float], list[float]]:
    """ms from a flush to our tables back: woken by the watch, and on the old timer."""
    ns = NetworkNamespace(f"bvbench-{os.getpid()}-drift")
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    woken, timed = [], []
    logging.getLogger("browservm.hostnet").setLevel(logging.ERROR)  # each restoration's warning, 20 times
    with tempfile.TemporaryDirectory() as state, Store(Path(state) / "state.sqlite3") as store, \
            HostNetwork(plan, store, ns) as network:
        try:
            network.up()
            with network.watch() as watch:
                for _ in range(rounds):
                    flushed = _flush(ns)
                    _next_change(watch)
                    network.check_and_restore()
                    woken.append((time.perf_counter() - flushed) * 1000)
                    asyncio.run(watch.changed(0.5))  # our restore, an `nft` process, notified too
                stop = threading.Event()

                def timer() -> None:
                    while not stop.wait(OLD_TIMER_S):
                        network.check_and_restore()
                ticking = threading.Thread(target=timer)
                ticking.start()
                try:
                    for _ in range(rounds):
                        time.sleep(random.uniform(0, OLD_TIMER_S))  # a flush comes at any point of the period
                        flushed = _flush(ns)
                        _next_change(watch)  # the flush itself
                        timed.append((_next_change(watch) - flushed) * 1000)  # the timer's restore
                finally:
                    stop.set()
                    ticking.join()
            network.down(force=True)
        finally:
            network.close()
            ns.delete()
    return woken, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="50,200,1000")
    parser.add_argument("--baseline-count", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds, each with and without rules")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per throughput measurement")
    parser.add_argument("--flushes", type=int, default=10, help="flushed rulesets, each way")
    parser.add_argument("--only-drift", action="store_true", help="the flushed-ruleset measurement alone")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    if not args.only_drift:
        per_vm_and_throughput(args, counts)
    woken, timed = drift_window(args.flushes)
    print(f"\na flushed ruleset, {args.flushes} flushes each way: our tables back after "
          f"{statistics.median(woken):.0f} ms median (max {max(woken):.0f}) woken by the kernel's notification, "
          f"{statistics.median(timed):.0f} ms median (max {max(timed):.0f}) on the old {OLD_TIMER_S:g} s timer: "
          f"{statistics.median(timed) / statistics.median(woken):.0f}x sooner")


def per_vm_and_throughput(args: argparse.Namespace, counts: list[int]) -> None:

    base_setup, base_teardown = measure(args.baseline_count, use_netlink=False, subnet="10.99.0.0/22")
    print(_row(f"baseline ip, {args.baseline_count} VMs", base_setup, base_teardown))
    results = {}
    for count in counts:
        results[count] = measure(count, use_netlink=True, subnet="10.99.0.0/22")
        print(_row(f"browservm, {count} VMs", *results[count]))

    reference = results.get(args.baseline_count) or results[counts[0]]
    speedup_setup = statistics.median(base_setup) / statistics.median(reference[0])
    speedup_teardown = statistics.median(base_teardown) / statistics.median(reference[1])
    print(f"\nratio baseline/browservm (median, {args.baseline_count} VMs): "
          f"setup {speedup_setup:.1f}x, teardown {speedup_teardown:.1f}x   (target >= 10x)")
    smallest, largest = min(counts), max(counts)
    growth = statistics.median(results[largest][0]) / statistics.median(results[smallest][0])
    print(f"per-VM setup, {largest} vs {smallest} VMs: {growth:.2f}x   (flat is 1.0)")
    print(f"median setup at {args.baseline_count} VMs: {statistics.median(reference[0]):.2f} ms   (target <= 5 ms)")

    print("\nanti-spoofing rules (issue 10): per-VM cost with against without")
    plain = {}
    for count in counts:
        plain[count] = measure(count, use_netlink=True, subnet="10.99.0.0/22", antispoof=False)
        print(_row(f"without rules, {count} VMs", *plain[count]))
        print(_row(f"with rules, {count} VMs", *results[count]))
    for count in counts:
        extra = statistics.median(results[count][0]) - statistics.median(plain[count][0])
        print(f"{count:>5} VMs: setup with/without {statistics.median(results[count][0]):.2f}/"
              f"{statistics.median(plain[count][0]):.2f} ms (+{extra:.2f} ms), teardown with/without "
              f"{statistics.median(results[count][1]):.2f}/{statistics.median(plain[count][1]):.2f} ms")
    print(f"per-VM setup with rules, {largest} vs {smallest} VMs: {growth:.2f}x (flat is 1.0; target <= 2 ms median)")

    with_rules, without = throughput(args.rounds, args.seconds)
    ratio = statistics.median(with_rules) / statistics.median(without)
    print(f"\nbridged TCP guest -> host, {args.rounds} x {args.seconds:.0f} s each: with rules "
          f"{statistics.median(with_rules):.0f} MB/s, without {statistics.median(without):.0f} MB/s, "
          f"ratio {ratio:.1%}   (target >= 95%)")
    pairs = sorted(w / o for w, o in zip(with_rules, without, strict=True))
    print("  per round with/without: " + " ".join(f"{p:.0%}" for p in pairs)
          + f"   (median of the paired ratios {statistics.median(pairs):.1%})")


if __name__ == "__main__":
    main()
