"""Benchmark: `browservm doctor VM_ID` on a healthy VM and on each fault, 10 runs each.

Runs on the stand-in guest of tests/integration/test_doctor_standin.py (a namespace behind a veth
on the bridge, with a desktop on :6080 that speaks RFB): the same host network, records, console
and probes as a real VM, without a 30 s boot under TCG for each of the 13 cases. Prints the
median time per run and per hop. Targets: <= 1 s healthy, <= 5 s worst case. Root.

    .venv/bin/python bench/doctor_bench.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.integration.conftest import Namespaces
from tests.integration.test_doctor_standin import FAULTS, Lab, stand_in


def measure(lab: Lab, case: str, runs: int) -> tuple[float, dict[str, float], str]:
    totals: list[float] = []
    per_hop: dict[str, list[float]] = {}
    verdict = ""
    for _ in range(runs):
        report = lab.diagnose(case)
        totals.append(report.seconds)
        for hop in report.hops:
            per_hop.setdefault(hop.hop, []).append(hop.seconds)
        verdict = f"{report.verdict} {report.first.hop}/{report.first.cause}" if report.first else "OK"
    return statistics.median(totals), {h: statistics.median(v) for h, v in per_hop.items()}, verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    rows: list[tuple[str, float, dict[str, float], str]] = []
    # The two faults that cannot be undone each get a fresh stand-in.
    groups = [[f for f in FAULTS if f[0] not in ("tap-deleted", "vmm-killed")],
              [f for f in FAULTS if f[0] == "tap-deleted"], [f for f in FAULTS if f[0] == "vmm-killed"]]
    spaces = Namespaces()
    try:
        for index, group in enumerate(groups):
            with tempfile.TemporaryDirectory() as tmp, stand_in(spaces, Path(tmp)) as lab:
                if index == 0:
                    rows.append(("healthy", *measure(lab, "healthy", args.runs)))
                for name, _hop, _cause, breaks, restores in group:
                    breaks(lab)
                    try:
                        rows.append((name, *measure(lab, name, args.runs)))
                    finally:
                        restores(lab)
    finally:
        spaces.cleanup()
    print(f"doctor VM_ID, median of {args.runs} runs (stand-in guest)\n")
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
