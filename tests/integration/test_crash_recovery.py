"""A crash at any point of `vm create` or `vm rm` leaves nothing that cannot be cleaned.

Each `vm create` (or `vm rm`) is a real process, killed with SIGKILL at one of its crash points
(browservm/faults.py): after each resource stage, between making the TAP and labelling it,
between spawning the VMM and recording its PID, and during each readiness hop. Then either
`serve` or, separately, `vm rm` runs on what the crash left. Afterwards nothing is left (no TAP,
lease, disk, VMM process, cgroup, record counting against limits) or the VM was adopted and is
alive and ready; and neither command wedges on what the crash left.

The crashes run at once, several guests booting together, to keep the suite's time in bounds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from browservm.faults import ENV as CRASH_AT
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm.placement import CGROUP_BASE, cgroup2_root

from .conftest import TEST_DISK_MIB, Controllers, run, vmm_pids_under

pytestmark = [pytest.mark.host, pytest.mark.vm]

RESOURCE_POINTS = ["record:done", "net.lease:done", "net.tap.created", "net.tap:done", "disk.clone:done",
                   "vmm.spawn:unrecorded", "vmm.spawn:done"]
# The default desktop path (rfb) has no ws.upgrade hop.
READINESS_POINTS = ["guest.network:during", "net.arp:during", "desktop.ready:during", "net.tcp:during",
                    "rfb.banner:during", "desktop.complete:during"]
RM_POINTS = ["destroy:marked", "release.vmm:done", "release.tap:done", "release.lease:done"]
_TIMEOUT = 600


def _command(controllers: Controllers, *args: str) -> list[str]:
    return [sys.executable, "-m", "browservm", *args, "--netns", controllers.netns,
            "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
            "--rootfs", str(controllers.rootfs), "--vmm", "qemu"]


def _env(crash_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "BROWSERVM_MAX_VMS_PER_USER": "64", "BROWSERVM_MAX_VMS": "64",
           "BROWSERVM_DISK_MIB": str(TEST_DISK_MIB)}
    env.pop(CRASH_AT, None)
    if crash_at is not None:
        env[CRASH_AT] = crash_at
    return env


def browservm(controllers: Controllers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(controllers, *args), capture_output=True, text=True, timeout=_TIMEOUT,
                          env=_env(), check=False)


@dataclass
class Crash:
    point: str
    process: subprocess.Popen[str]


def crash_creates(controllers: Controllers, points: list[str]) -> dict[str, Crash]:
    """Start one `vm create` per crash point, all at once; wait until every one has died of SIGKILL."""
    crashes = {point: Crash(point, subprocess.Popen(
        _command(controllers, "vm", "create", "--mem", "512", "--user", point),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(point))) for point in points}
    for crash in crashes.values():
        output, _ = crash.process.communicate(timeout=_TIMEOUT)
        assert crash.process.returncode == -signal.SIGKILL, (crash.point, output[-3000:])
    return crashes


def records(controllers: Controllers) -> list[VmRecord]:
    with Store(controllers.state_dir / "state.sqlite3") as store:
        return VmRecords(store).all()


def by_point(controllers: Controllers) -> dict[str, VmRecord]:
    return {record.user: record for record in records(controllers)}


def leftovers(controllers: Controllers, except_vms: frozenset[str] | set[str] = frozenset()) -> dict[str, object]:
    """What the kernel, the file system and the store still hold, for VMs other than `except_vms`."""
    settings = controllers.settings()
    with Store(settings.database) as store:
        leases = [lease.vm_id for lease in Ipam(store, NetworkPlan.build(settings.subnet, settings.bridge)).leases()]
        holding = [r.vm_id for r in VmRecords(store).all() if r.holds_resources]
    vms = controllers.state_dir / "vms"
    taps = run("ip", "-o", "link", "show", "type", "tun", netns=controllers.netns).stdout.splitlines()
    keep_taps = {r.tap for r in records(controllers) if r.vm_id in except_vms}
    root = cgroup2_root()
    base = None if root is None else root / CGROUP_BASE
    cgroups = [p.name for p in base.iterdir() if p.is_dir()] if base is not None and base.exists() else []
    return {
        "taps": [t for t in taps if t.split(":")[1].strip().split("@")[0] not in keep_taps],
        "leases": [v for v in leases if v not in except_vms],
        "holding": [v for v in holding if v not in except_vms],
        "vm directories": [p.name for p in vms.iterdir() if p.name not in except_vms] if vms.exists() else [],
        "vmm processes": [pid for pid in vmm_pids_under(controllers.state_dir)
                          if not any(vm_id in Path(f"/proc/{pid}/cmdline").read_text() for vm_id in except_vms)],
        "cgroups": [c for c in cgroups if c not in except_vms and c in {r.vm_id for r in records(controllers)}],
    }


NOTHING: dict[str, object] = {"taps": [], "leases": [], "holding": [], "vm directories": [], "vmm processes": [],
                             "cgroups": []}


class Serving:
    """`browservm serve` as a subprocess, its output read line by line."""

    def __init__(self, controllers: Controllers) -> None:
        self.process = subprocess.Popen(_command(controllers, "serve", "--listen", "127.0.0.1:0"),
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())
        self.lines: list[str] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("serve: listening"):
                return
        raise AssertionError("serve ended before watching:\n" + "\n".join(self.lines))

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=60)


def settle(controllers: Controllers, deadline_s: float = _TIMEOUT) -> dict[str, VmRecord]:
    """Wait until no VM is creating, booting or destroying any more (serve adopts or fails them)."""
    deadline = time.monotonic() + deadline_s
    while True:
        current = by_point(controllers)
        if all(r.state in (VmState.READY, VmState.FAILED) for r in current.values()):
            return current
        assert time.monotonic() < deadline, {p: r.state for p, r in current.items()}
        time.sleep(0.5)


def test_serve_cleans_up_or_adopts_whatever_a_crashed_create_left(controllers: Controllers) -> None:
    controllers.open()  # host up
    crash_creates(controllers, RESOURCE_POINTS + READINESS_POINTS)
    serving = Serving(controllers)
    try:
        settled = settle(controllers)
    finally:
        serving.stop()
    adopted = {r.vm_id for r in settled.values() if r.state == VmState.READY}
    # A VMM that was running and recorded is adopted and finishes readiness; everything else is failed
    # and released, with the hop where its creator stopped.
    for point, record in settled.items():
        if point in ("vmm.spawn:done", *READINESS_POINTS):
            assert record.state == VmState.READY, (point, record.failure, serving.lines)
            assert record.pid is not None and Path(f"/proc/{record.pid}").exists()
        else:
            assert record.state == VmState.FAILED and not record.holds_resources, (point, record)
            assert record.failure is not None and record.failure.hop == "controller", (point, record.failure)
    assert leftovers(controllers, adopted) == NOTHING

    # The adopted VMs are whole VMs: `vm rm` of each, with a crash at each point of the destroy,
    # then another `vm rm` (for half of them) or `serve` (for the rest) finishes the job.
    ready = sorted(adopted)
    for follow_up, vm_ids in (("vm rm", ready[:len(RM_POINTS)]), ("serve", ready[len(RM_POINTS):])):
        for vm_id, point in zip(vm_ids, RM_POINTS, strict=False):
            crashed = subprocess.run(_command(controllers, "vm", "rm", vm_id), capture_output=True, text=True,
                                     timeout=_TIMEOUT, env=_env(point), check=False)
            assert crashed.returncode == -signal.SIGKILL, (point, crashed.stdout, crashed.stderr)
            assert {r.vm_id: r.state for r in records(controllers)}[vm_id] == VmState.DESTROYING
        if follow_up == "vm rm":
            for vm_id in vm_ids:
                again = browservm(controllers, "vm", "rm", vm_id)
                assert again.returncode == 0 and "removed" in again.stdout, again.stderr
        else:
            finishing = Serving(controllers)
            finishing.stop()
            assert sum("finished destroying" in line for line in finishing.lines) == len(vm_ids), finishing.lines
    assert records(controllers) == [r for r in records(controllers) if r.state == VmState.FAILED]
    assert leftovers(controllers) == NOTHING


def test_vm_rm_removes_whatever_a_crashed_create_left(controllers: Controllers) -> None:
    controllers.open()
    crash_creates(controllers, RESOURCE_POINTS + READINESS_POINTS)
    for point, record in by_point(controllers).items():
        removed = browservm(controllers, "vm", "rm", record.vm_id)
        assert removed.returncode == 0 and "removed" in removed.stdout, (point, removed.stdout, removed.stderr)
    assert records(controllers) == []
    assert leftovers(controllers) == NOTHING
