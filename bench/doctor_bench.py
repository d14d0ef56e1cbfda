"""Benchmark: `browservm doctor VM_ID` on a healthy VM and on each fault, 10 runs each.

Runs on the stand-in guest of tests/integration/test_doctor_standin.py (a namespace behind a veth
on the bridge, with a desktop on :6080 that speaks RFB): the same host network, records, console
and probes as a real VM, without a 30 s boot under TCG for each of the 13 cases. With
--real-guests it also measures the two in-guest faults (websockify stopped, x11vnc stopped) on
real guests, booted side by side from test-only images as tests/integration/test_doctor_vm.py does
(about 20 s more; it boots VMs, so run it under the VM lock). Prints the median time per run and
per hop. Targets: <= 1 s healthy, <= 5 s worst case. Root.

    .venv/bin/python bench/doctor_bench.py [--runs N]
    flock /tmp/browservm-vm.lock .venv/bin/python bench/doctor_bench.py --real-guests
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from browservm.doctor import Doctor, Report
from browservm.doctor.local import sources
from browservm.images.kernel_build import WITH_IP_PNP, KernelBuilder
from browservm.images.rootfs import RootfsBuilder
from browservm.progress import Progress
from browservm.runner import CommandRunner
from browservm.vm.records import VmRecords
from tests.integration.conftest import Controllers, Namespaces
from tests.integration.test_doctor_standin import FAULTS, stand_in
from tests.integration.test_doctor_vm import in_guest_vms_booted

Row = tuple[str, float, dict[str, float], str]


def measure(diagnose: Callable[[], Report], runs: int) -> tuple[float, dict[str, float], str]:
    totals: list[float] = []
    per_hop: dict[str, list[float]] = {}
    verdict = ""
    for _ in range(runs):
        report = diagnose()
        totals.append(report.seconds)
        for hop in report.hops:
            per_hop.setdefault(hop.hop, []).append(hop.seconds)
        verdict = f"{report.verdict} {report.first.hop}/{report.first.cause}" if report.first else "OK"
    return statistics.median(totals), {h: statistics.median(v) for h, v in per_hop.items()}, verdict


def diagnose(doctor: Doctor, vm_id: str) -> Report:
    return asyncio.run(doctor.vm(vm_id))


def real_guest_rows(runs: int) -> list[Row]:
    """The in-guest faults on real guests (QEMU, minimal image): built or cached kernel and image."""
    kernel = KernelBuilder.packaged(CommandRunner(), Progress()).build(WITH_IP_PNP).vmlinux
    image = RootfsBuilder(CommandRunner(), Progress()).build("minimal").path
    rows: list[Row] = []
    spaces = Namespaces()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            controllers = Controllers(spaces, Path(tmp) / "state", kernel, image)
            try:
                with in_guest_vms_booted(controllers, image, Path(tmp)) as vms:
                    for name, (controller, record) in vms.items():
                        doctor = Doctor(sources(controller.settings, network=controller.network,
                                                records=VmRecords(controller.store)))
                        rows.append((f"{name} (VM)", *measure(functools.partial(diagnose, doctor, record.vm_id),
                                                                runs)))
            finally:
                controllers.cleanup()
    finally:
        spaces.cleanup()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--real-guests", action="store_true",
                        help="also the in-guest faults on real guests (boots two VMs: hold the VM lock)")
    args = parser.parse_args()
    rows: list[Row] = []
    # The two faults that cannot be undone each get a fresh stand-in.
    groups = [[f for f in FAULTS if f[0] not in ("tap-deleted", "vmm-killed")],
              [f for f in FAULTS if f[0] == "tap-deleted"], [f for f in FAULTS if f[0] == "vmm-killed"]]
    spaces = Namespaces()
    try:
        for index, group in enumerate(groups):
            with tempfile.TemporaryDirectory() as tmp, stand_in(spaces, Path(tmp)) as lab:
                if index == 0:
                    rows.append(("healthy", *measure(functools.partial(lab.diagnose, "healthy"), args.runs)))
                for name, _hop, _cause, breaks, restores in group:
                    breaks(lab)
                    try:
                        rows.append((name, *measure(functools.partial(lab.diagnose, name), args.runs)))
                    finally:
                        restores(lab)
    finally:
        spaces.cleanup()
    if args.real_guests:
        rows += real_guest_rows(args.runs)
    print(f"doctor VM_ID, median of {args.runs} runs (stand-in guest; \"(VM)\": a real guest)\n")
    print(f"{'case':<24} {'run ms':>8}  {'verdict':<44} slowest hops (ms)")
    for name, total, hops, verdict in rows:
        slowest = sorted(hops.items(), key=lambda item: -item[1])[:3]
        print(f"{name:<24} {total * 1000:8.1f}  {verdict:<44} "
              + ", ".join(f"{hop} {seconds * 1000:.1f}" for hop, seconds in slowest))
    healthy = rows[0][1]
    worst = max(row[1] for row in rows)
    print(f"\nhealthy {healthy * 1000:.0f} ms (target <= 1000), worst {worst * 1000:.0f} ms (target <= 5000)")
    return 0 if healthy <= 1.0 and worst <= 5.0 else 1


if __name__ == "__main__":
    sys.exit(main())
