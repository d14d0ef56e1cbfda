"""Per-VM network setup and teardown: browservm (netlink) against `ip` subprocesses.

Run as root: python3 bench/hostnet_bench.py [--counts 50,200,1000] [--baseline-count 200]

Everything happens in a network namespace this script creates and deletes.
Setup is lease + TAP create + attach to the bridge + up (+ port isolation);
teardown is TAP delete + lease release. The baseline does the same TAP work
with `ip tuntap add` / `ip link set` subprocesses (and the same lease), in the
same run, so the ratio does not depend on the machine.
Targets (issue 2): median setup <= 5 ms per VM, >= 10x faster than the
baseline, flat per-VM cost as the count grows.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
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


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(count: int, use_netlink: bool, subnet: str) -> tuple[list[float], list[float]]:
    """Set up and tear down `count` VMs in a fresh namespace; per-VM times in ms."""
    ns = NetworkNamespace(f"bvbench-{os.getpid()}")
    plan = NetworkPlan.build(IPv4Network(subnet), "br0")
    with tempfile.TemporaryDirectory() as state, Store(Path(state) / "state.sqlite3") as store, \
            HostNetwork(plan, store, ns) as network:
        ipam = Ipam(store, plan)
        runner = Browservm(ipam, network) if use_netlink else Baseline(ipam, ns)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="50,200,1000")
    parser.add_argument("--baseline-count", type=int, default=200)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]

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


if __name__ == "__main__":
    main()
