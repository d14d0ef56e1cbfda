"""Snapshot and restore, as the manager orchestrates them (fake VMM: `sleep`; the real QEMU path is
tests/integration/test_restore.py)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from browservm.errors import VmmError
from browservm.guest import configdisk
from browservm.vm.snapshots import Snapshot
from browservm.vm.state import VmState
from browservm.vmdir import CONFIG_DISK

from .fakes import NOTHING, FakeProbes, Parts


def test_a_snapshot_is_made_once_from_a_ready_vm_which_is_gone_after(parts: Parts) -> None:
    manager = parts.manager()
    snapshot = asyncio.run(manager.snapshot())
    assert parts.driver.saved and snapshot.state.exists() and snapshot.overlay.exists()
    assert snapshot.made_from == parts.driver.saved[0]
    assert parts.leftovers() == NOTHING  # the VM it was made of is destroyed
    assert asyncio.run(manager.snapshot()) == snapshot and len(parts.driver.saved) == 1  # made once
    assert not any(p.name.startswith(".") for p in snapshot.directory.parent.iterdir())  # no staging left


def test_a_snapshot_waits_for_the_browser_painted_when_the_desktop_has_one(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam, desktop=("xvfb", "openbox", "x11vnc", "chromium"))
    painted = probes.hang_at("browser.screen")
    manager = parts.manager(probes)

    async def scenario() -> Snapshot:
        making = asyncio.create_task(manager.snapshot())
        await asyncio.wait_for(probes.reached["browser.screen"].wait(), 10)
        assert not parts.driver.saved  # nothing saved while Chromium may still be painting
        [record] = await manager.all()
        password = configdisk.read(Path(record.directory) / CONFIG_DISK)["secrets"]["vnc"]
        assert probes.screens == [(5901, password)]  # x11vnc itself, with the VM's own password
        settled = probes.hang_at("vm.settled")
        painted.set()
        await asyncio.wait_for(probes.reached["vm.settled"].wait(), 10)
        assert not parts.driver.saved  # nor while the guest is still busy
        settled.set()
        return await asyncio.wait_for(making, 10)

    snapshot = asyncio.run(scenario())
    assert parts.driver.saved and snapshot.state.exists()


def test_a_browser_that_never_shows_fails_the_snapshot_and_leaves_nothing(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam, desktop=("xvfb", "chromium"),
                        fail={"browser.screen": "the browser was not on screen within 180 s (40 frames, ...)"})
    manager = parts.manager(probes)
    with pytest.raises(VmmError) as excinfo:
        asyncio.run(manager.snapshot())
    assert "desktop.complete: Chromium runs but its window never showed" in excinfo.value.reason
    assert "40 frames" in excinfo.value.reason
    assert not parts.driver.saved and asyncio.run(manager.snapshot_of()) is None
    assert parts.leftovers() == NOTHING
    assert not manager.snapshots.root.exists() or not any(manager.snapshots.root.iterdir())  # no staging left


def test_a_desktop_without_a_browser_is_saved_without_looking_at_its_screen(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam, desktop=("xvfb", "openbox", "x11vnc", "websockify"))
    asyncio.run(parts.manager(probes).snapshot())
    assert parts.driver.saved and probes.screens == []


def test_a_restored_vm_gets_the_snapshots_disk_its_own_identity_and_its_link_after_guest_network(
        parts: Parts) -> None:
    manager = parts.manager()
    snapshot = asyncio.run(manager.snapshot())
    snapshot.overlay.chmod(0o600)
    snapshot.overlay.write_bytes(b"the desktop's disk at the snapshot")
    record = asyncio.run(manager.create("ann", restore=True))
    assert record.state == VmState.READY, record.failure
    assert (record.started_from, record.snapshot) == ("restored", snapshot.key)
    assert parts.driver.restored == [record.vm_id] and parts.driver.links_up == [record.vm_id]
    directory = Path(record.directory)
    assert (directory / "overlay.ext4").read_bytes() == b"the desktop's disk at the snapshot"
    document = configdisk.read(directory / CONFIG_DISK)
    identity = document["identity"]
    assert document["vm_id"] == record.vm_id
    assert (identity["mac"], identity["address"], identity["gateway"]) == (record.mac, record.address,
                                                                          record.gateway)
    assert len(bytes.fromhex(identity["entropy"])) == 64 and identity["time"] >= record.created_at
    assert document["secrets"]["vnc"] and document["secrets"]["agent"]


def test_where_the_vmm_cannot_hold_the_link_the_tap_is_down_until_the_guest_took_its_identity(
        parts: Parts) -> None:
    manager = parts.manager()
    asyncio.run(manager.snapshot())
    parts.driver.holds_link = False  # as Firecracker, which has no link control
    parts.network.calls.clear()
    record = asyncio.run(manager.create("ann", restore=True))
    assert record.state == VmState.READY, record.failure
    tap = record.tap
    assert parts.network.calls == [f"add {record.vm_id}", f"down {tap}", f"up {tap}"]
    assert parts.driver.links_up == []  # the VMM was not asked


def test_without_a_snapshot_a_restore_request_boots_cold(parts: Parts) -> None:
    record = asyncio.run(parts.manager().create(restore=True))
    assert record.state == VmState.READY and (record.started_from, record.snapshot) == ("cold", "")
    assert parts.driver.restored == []


def test_a_snapshot_is_never_used_with_another_image(parts: Parts) -> None:
    manager = parts.manager()
    first = asyncio.run(manager.snapshot())
    assert asyncio.run(manager.snapshot_of()) == first
    parts.images.rootfs.unlink()
    parts.images.rootfs.write_bytes(b"another image")  # a new file: another inode, size and time
    assert asyncio.run(manager.snapshot_of()) is None
    record = asyncio.run(manager.create(restore=True))
    assert record.started_from == "cold"
    second = asyncio.run(manager.snapshot())
    assert second.key != first.key and second.inputs["rootfs"] != first.inputs["rootfs"]


def test_snapshots_are_per_size(parts: Parts) -> None:
    manager = parts.manager()
    asyncio.run(manager.snapshot(vcpus=1, mem_mib=1024))
    assert asyncio.run(manager.snapshot_of(vcpus=2, mem_mib=1024)) is None
    assert asyncio.run(manager.snapshot_of(vcpus=1, mem_mib=1024)) is not None
    assert os.listdir(parts.vm_root) == []
