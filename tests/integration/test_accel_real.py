"""The accelerator on this machine's real /dev/kvm, with real QEMU and real guests (issue 17).

Here /dev/kvm is a nested PVM device: our kernel starts under it, prints its first lines and is
then stopped by a KVM internal error (QEMU keeps the VM paused). On a host whose KVM runs the
kernel, the same tests check that KVM is chosen and kept. Each test has an accelerator cache of
its own (XDG_CACHE_HOME): the first create probes from nothing, as on a new host.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path

import pytest

from browservm.images.kernel_build import WITH_IP_PNP, BuiltKernel
from browservm.vm import hops
from browservm.vm.state import VmState
from browservm.vmm.accel import AccelProbe
from browservm.vmm.qemu import QEMU

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]


@pytest.fixture(autouse=True)
def empty_accel_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))  # the kernel and image are given: only the accel cache
    return cache / "browservm" / "accel" / "accel.json"


@pytest.fixture(scope="module")
def kvm_runs_it(tmp_path_factory: pytest.TempPathFactory, built: dict[str, BuiltKernel]) -> bool:
    """What this host's KVM does with our kernel, probed apart from the tests (their caches stay empty)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm on this host: nothing to choose")
    probe = AccelProbe(QEMU, cache=tmp_path_factory.mktemp("probe") / "accel.json")
    return probe.probe(built[WITH_IP_PNP.name].vmlinux).name == "kvm"


def test_from_an_empty_cache_auto_chooses_by_what_a_guest_does_and_the_vm_comes_up(
        controllers: Controllers, kvm_runs_it: bool, empty_accel_cache: Path) -> None:
    controller = controllers.open()
    record = asyncio.run(controller.manager.create())
    assert record.state == VmState.READY, record.failure
    assert record.accel == ("kvm" if kvm_runs_it else "tcg") and record.retried_after is None
    if not kvm_runs_it:
        # The probe's own evidence, as this machine's QEMU gave it.
        assert "KVM internal error" in record.accel_reason or "under KVM this kernel" in record.accel_reason
    assert record.accel_reason in controller.manager.driver.accel_status()
    assert json.loads(empty_accel_cache.read_text())  # kept for the next VMs of this boot
    asyncio.run(controller.manager.destroy(record.vm_id))


def test_a_stale_kvm_choice_is_caught_by_the_first_guest_and_the_create_retried_under_tcg(
        controllers: Controllers, kvm_runs_it: bool, empty_accel_cache: Path) -> None:
    """As after an upgrade from a browservm whose probe stopped at `Linux version`: the cache says KVM."""
    if kvm_runs_it:
        pytest.skip("KVM runs this kernel on this host: a guest is not stopped, there is nothing to retry")
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    digest = hashlib.sha256(controllers.kernel.read_bytes()).hexdigest()[:16]
    empty_accel_cache.parent.mkdir(parents=True)
    empty_accel_cache.write_text(json.dumps({f"{boot}/{digest}": {"name": "kvm", "reason": "an old probe"}}))
    controller = controllers.open()
    record = asyncio.run(controller.manager.create())
    assert record.state == VmState.READY, record.failure
    first = record.retried_after
    assert first is not None and record.accel == "tcg"
    assert first["accel"] == "kvm" and first["hop"] in (hops.VMM_STOPPED, hops.GUEST_STALLED)
    if first["hop"] == hops.VMM_STOPPED:
        assert "status 'internal-error'" in first["reason"]
        assert any("KVM internal error" in line for line in first["vmm_log"]), first["vmm_log"]
    # Named within seconds of the first VMM's start, not after guest.network's 180 s.
    assert hops.GUEST_NETWORK not in first["stages"]
    cached = json.loads(empty_accel_cache.read_text())[f"{boot}/{digest}"]
    assert cached["name"] == "tcg" and "stopped under KVM" in cached["reason"]
    asyncio.run(controller.manager.destroy(record.vm_id))


def test_with_kvm_set_by_hand_a_stopped_guest_fails_at_once_with_qemus_words(
        controllers: Controllers, kvm_runs_it: bool) -> None:
    if kvm_runs_it:
        pytest.skip("KVM runs this kernel on this host: no guest is stopped")
    controller = controllers.open(accel="kvm")
    record = asyncio.run(controller.manager.create())
    failure = record.failure
    assert record.state == VmState.FAILED and failure is not None and record.retried_after is None
    assert failure.hop in (hops.VMM_STOPPED, hops.GUEST_STALLED), failure
    spawned, failed_at = record.stages[hops.VMM_SPAWN], (record.failed_at or 0) - record.created_at
    print(f"named {failed_at - spawned:.1f} s after the VMM started: {failure.hop}: {failure.reason}")
    assert failed_at - spawned < 30  # seconds, not guest.network's 180
    if failure.hop == hops.VMM_STOPPED:
        assert any("KVM internal error" in line for line in failure.vmm_log), failure.vmm_log
    assert record.accel == "kvm" and "--accel kvm" in record.accel_reason
    assert not record.holds_resources
