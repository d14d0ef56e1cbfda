"""The manager's orchestration against fakes: refusals, limits, and undo on failure.

What the fakes stand in for (TAPs, VMMs) is tested for real in tests/integration.
"""

from __future__ import annotations

import asyncio
import threading
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.errors import InvalidInput, LimitExceeded, VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store
from browservm.vm.manager import Images, Limits, VMManager
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec


class FakeNetwork:
    def __init__(self) -> None:
        self.netns = NetworkNamespace(None)
        self.taps: set[str] = set()
        self.calls: list[str] = []

    def add_tap(self, lease: Lease) -> None:
        self.calls.append(f"add {lease.vm_id}")
        self.taps.add(lease.vm_id)

    def remove_tap(self, vm_id: str) -> bool:
        self.calls.append(f"remove {vm_id}")
        present = vm_id in self.taps
        self.taps.discard(vm_id)
        return present

    def owned_taps(self) -> dict[str, str]:
        return {f"tap-{vm_id}": vm_id for vm_id in self.taps}


class FailingDriver:
    name = "fake"

    def accel(self, kernel: Path) -> str:
        return "tcg"

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        assert spec.overlay is not None and spec.overlay.exists()  # the disk exists before the VMM starts
        raise VmmError(spec.vm_id, "start", "cannot run fake-vmm: No such file or directory")

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        raise AssertionError("never started, never stopped")


@pytest.fixture
def parts(tmp_path: Path) -> tuple[VMManager, FakeNetwork, Ipam, Path]:
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0"))
    template = tmp_path / "template.ext4"
    template.write_bytes(b"\0" * 4096)
    images = Images(kernel=tmp_path / "vmlinux", rootfs=tmp_path / "rootfs.ext4", disk_template=template)
    network = FakeNetwork()
    manager = VMManager(records=VmRecords(store), ipam=ipam, network=network, driver=FailingDriver(),
                        images=lambda: images, vm_root=tmp_path / "vms", limits=Limits(max_vms=4, max_vms_per_user=2))
    return manager, network, ipam, tmp_path / "vms"


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"vcpus": 0}, "vcpus"), ({"vcpus": 64}, "vcpus"), ({"mem_mib": 16}, "mem_mib"), ({"user": ""}, "user"),
])
def test_bad_requests_are_refused_before_anything_is_allocated(
        parts: tuple[VMManager, FakeNetwork, Ipam, Path], kwargs: dict[str, object], field: str) -> None:
    manager, network, ipam, _ = parts
    with pytest.raises(InvalidInput) as excinfo:
        asyncio.run(manager.create(**kwargs))  # type: ignore[arg-type]
    assert excinfo.value.field == field
    assert manager.all() == [] and ipam.leases() == [] and network.calls == []


def test_a_failed_start_undoes_every_stage_in_reverse_and_says_which_hop(
        parts: tuple[VMManager, FakeNetwork, Ipam, Path]) -> None:
    manager, network, ipam, vm_root = parts
    record = asyncio.run(manager.create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert (record.failure.hop, record.failure.reason) == ("vmm", "cannot run fake-vmm: No such file or directory")
    assert list(record.stages) == ["net.lease", "net.tap", "disk.clone"]
    assert network.calls == [f"add {record.vm_id}", f"remove {record.vm_id}"]
    assert ipam.leases() == [] and list(vm_root.iterdir()) == []
    assert not record.holds_resources


def test_keep_failed_keeps_the_resources_for_diagnosis(parts: tuple[VMManager, FakeNetwork, Ipam, Path]) -> None:
    manager, network, ipam, vm_root = parts
    record = asyncio.run(manager.create(keep_failed=True))
    assert record.state == VmState.FAILED and record.holds_resources
    assert network.taps == {record.vm_id} and [lease.vm_id for lease in ipam.leases()] == [record.vm_id]
    assert (vm_root / record.vm_id / "overlay.ext4").exists()
    assert asyncio.run(manager.destroy(record.vm_id))
    assert network.taps == set() and ipam.leases() == [] and list(vm_root.iterdir()) == []


def test_limits_count_vms_that_hold_resources(parts: tuple[VMManager, FakeNetwork, Ipam, Path]) -> None:
    manager, _, _, _ = parts
    for _ in range(2):
        asyncio.run(manager.create(user="ann", keep_failed=True))
    with pytest.raises(LimitExceeded, match="user 'ann' already has 2 VMs"):
        asyncio.run(manager.create(user="ann"))
    asyncio.run(manager.create(user="bob"))  # failed and released: does not count
    asyncio.run(manager.create(user="bob", keep_failed=True))
    asyncio.run(manager.create(user="cat", keep_failed=True))
    with pytest.raises(LimitExceeded, match="this host already runs 4 VMs"):
        asyncio.run(manager.create(user="dan"))


def test_concurrent_inserts_never_exceed_a_limit(tmp_path: Path) -> None:
    records = VmRecords(Store(tmp_path / "state.sqlite3"))
    accepted: list[str] = []

    def insert(i: int) -> None:
        try:
            records.insert(VmRecord(vm_id=f"vm-{i}", user="ann", vcpus=1, mem_mib=512, directory=""),
                           max_total=100, max_per_user=3)
            accepted.append(f"vm-{i}")
        except LimitExceeded:
            pass

    threads = [threading.Thread(target=insert, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 3 and len(records.all()) == 3
