"""The first VM on a new host, with the fake VMM: a create answers at once while its kernel and image
are built (each step told), a guest its VMM stops is named at once (and, under KVM, tried again
under TCG), a guest silent before userspace is named as such, and a failure keeps the VMM's log.
The same against real QEMU and this machine's /dev/kvm: tests/integration/test_accel_real.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from browservm.errors import ImageBuildError
from browservm.progress import BuildStep
from browservm.vm import hops
from browservm.vm.manager import VMManager
from browservm.vm.parts import Deadlines
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState

from .fakes import NOTHING, FakeProbes, Parts

DEADLINE = 20.0


def notes_of(manager: VMManager) -> list[tuple[str, str, str]]:
    told: list[tuple[str, str, str]] = []
    manager.on_note = lambda record, kind, detail: told.append((record.vm_id, kind, detail))
    return told


def test_a_create_answers_at_once_while_the_kernel_is_built_and_tells_each_step(parts: Parts) -> None:
    parts.build_steps = [BuildStep("the guest kernel", 1, 2, "tinyconfig"),
                         BuildStep("the guest kernel", 2, 2, "vmlinux", "make -j2 vmlinux", "/tmp/k.log")]
    parts.build_done = threading.Event()

    async def scenario() -> None:
        manager = parts.manager()
        told = notes_of(manager)
        started = time.monotonic()
        record, task = await manager.start("ann")
        assert time.monotonic() - started < 1.0 and record.state == VmState.CREATING
        while len(told) < 2:
            await asyncio.sleep(0.01)
        assert [(kind, detail) for _, kind, detail in told] == [
            ("build", "building the guest kernel, step 1 of 2: tinyconfig"),
            ("build", "building the guest kernel, step 2 of 2: vmlinux (make -j2 vmlinux)")]
        assert manager.building is not None and manager.building.log == "/tmp/k.log"
        assert not task.done() and not record.stages
        assert parts.build_done is not None
        parts.build_done.set()
        done = await asyncio.wait_for(task, DEADLINE)
        assert done.state == VmState.READY and manager.building is None
        await manager.destroy(done.vm_id)
        await manager.close()

    asyncio.run(scenario())
    assert parts.leftovers() == NOTHING


def test_a_build_that_fails_fails_the_vm_at_images_with_its_words(parts: Parts) -> None:
    parts.build_error = ImageBuildError("debootstrap", "mmdebstrap failed (log /root/.cache/browservm/x.log)")
    record = asyncio.run(parts.manager().create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert record.failure.hop == hops.IMAGES and "x.log" in record.failure.reason
    assert record.failure.hint == hops.hint(hops.IMAGES)
    assert parts.leftovers() == NOTHING


def _stop_guest_at(parts: Parts, probes: FakeProbes, hop: str) -> None:
    """When the create reaches `hop` (held there), the VMM stops running the guest (QEMU's STOP event)."""
    held = probes.hang_at(hop)
    parts.driver.stop_guest = asyncio.Event()

    async def stop() -> None:
        await probes.reached[hop].wait()
        assert parts.driver.stop_guest is not None
        parts.driver.stop_guest.set()
        await asyncio.sleep(0.5)
        held.set()  # a second attempt passes
    asyncio.get_running_loop().create_task(stop())


def test_a_guest_stopped_under_kvm_is_named_at_once_and_the_create_is_tried_again_under_tcg(parts: Parts) -> None:
    parts.driver.accel_name = "kvm"

    async def scenario() -> tuple[VmRecord, list[tuple[str, str, str]], float]:
        probes = FakeProbes(parts.ipam)
        manager = parts.manager(probes, deadlines=Deadlines(stop=5, arp=60))
        told = notes_of(manager)
        _stop_guest_at(parts, probes, hops.NET_ARP)
        started = time.monotonic()
        record = await manager.create()
        return record, told, time.monotonic() - started

    record, told, seconds = asyncio.run(scenario())
    assert record.state == VmState.READY and record.accel == "tcg", record.failure
    first = record.retried_after
    assert first is not None and first["accel"] == "kvm" and first["hop"] == hops.VMM_STOPPED
    assert "status 'internal-error'" in first["reason"] and hops.GUEST_NETWORK in first["stages"]
    assert first["vmm_log"] == [f"fake-vmm: started {record.vm_id}"]
    assert list(record.stages) == list(hops.NAMES[:4]) + [h for h in hops.READINESS if h != hops.WS_UPGRADE]
    assert [kind for _, kind, _ in told] == ["retry"] and "trying once more under TCG" in told[0][2]
    assert len(parts.driver.demoted) == 1 and hops.VMM_STOPPED in parts.driver.demoted[0]
    assert len(parts.driver.started) == 2 and len(parts.driver.alive()) == 1  # the first VMM was stopped
    assert seconds < 10
    asyncio.run(parts.manager().destroy(record.vm_id))
    assert parts.leftovers() == NOTHING


def test_a_guest_stopped_under_tcg_fails_at_vmm_stopped_with_the_vmm_log_kept(parts: Parts) -> None:
    async def scenario() -> VmRecord:
        probes = FakeProbes(parts.ipam)
        _stop_guest_at(parts, probes, hops.DESKTOP_READY)
        return await parts.manager(probes).create()

    record = asyncio.run(scenario())
    failure = record.failure
    assert record.state == VmState.FAILED and failure is not None and record.retried_after is None
    assert failure.hop == hops.VMM_STOPPED and "QMP event STOP" in failure.reason
    assert failure.hint == hops.hint(hops.VMM_STOPPED) and not parts.driver.demoted
    # Kept in the record: the VM's directory, where the log was, is gone.
    assert failure.vmm_log == (f"fake-vmm: started {record.vm_id}",)
    assert parts.leftovers() == NOTHING


def test_a_console_silent_before_userspace_is_a_stalled_guest_not_a_network_failure(parts: Parts) -> None:
    parts.driver.console_at_start = "[    0.0] Linux version 6.1\n[    3.7] x86/fpu: Supporting XSAVE feature 0x080\n"
    probes = FakeProbes(parts.ipam)
    probes.hang_at(hops.GUEST_NETWORK)  # as a guest that never gets there
    started = time.monotonic()
    record = asyncio.run(parts.manager(probes, deadlines=Deadlines(stop=5, kernel_silence=1.0)).create())
    failure = record.failure
    assert record.state == VmState.FAILED and failure is not None and time.monotonic() - started < 10
    assert failure.hop == hops.GUEST_STALLED
    assert "went silent before userspace" in failure.reason and "XSAVE feature 0x080" in failure.reason
    assert "still runs" in failure.reason and "of a CPU" in failure.reason
    assert failure.evidence[-1].endswith("XSAVE feature 0x080")
    assert parts.leftovers() == NOTHING


def test_a_vmm_that_cannot_be_watched_still_has_its_console_watched(parts: Parts) -> None:
    parts.driver.watch_fails = True
    parts.driver.console_at_start = "[    0.0] Linux version 6.1\n"
    probes = FakeProbes(parts.ipam)
    probes.hang_at(hops.GUEST_NETWORK)
    record = asyncio.run(parts.manager(probes, deadlines=Deadlines(stop=5, kernel_silence=0.5)).create())
    assert record.failure is not None and record.failure.hop == hops.GUEST_STALLED
    assert parts.leftovers() == NOTHING


def test_a_guest_in_userspace_may_stay_quiet(parts: Parts) -> None:
    """After userspace a quiet console is normal: services start without printing."""
    probes = FakeProbes(parts.ipam)
    held = probes.hang_at(hops.DESKTOP_READY)

    async def scenario() -> VmRecord:
        manager = parts.manager(probes, deadlines=Deadlines(stop=5, kernel_silence=0.3))
        _, task = await manager.start()
        await probes.reached[hops.DESKTOP_READY].wait()
        await asyncio.sleep(1.0)  # three times the silence allowed before userspace
        held.set()
        done = await task
        await manager.destroy(done.vm_id)
        return done

    assert asyncio.run(scenario()).state == VmState.READY
    assert parts.leftovers() == NOTHING


def test_a_restored_vm_is_not_watched_for_a_kernel_that_stalls(parts: Parts, tmp_path: Path) -> None:
    """A restored guest prints nothing of a kernel boot, and its VMM's control channel brings its link up."""
    parts.driver.console_at_start = ""

    async def scenario() -> VmRecord:
        manager = parts.manager(deadlines=Deadlines(stop=5, kernel_silence=0.3))
        parts.driver.console_at_start = "[    0.9] Run /sbin/init as init process\n"
        await manager.snapshot()
        parts.driver.console_at_start = ""
        record = await manager.create(restore=True)
        await manager.destroy(record.vm_id)
        return record

    record = asyncio.run(scenario())
    assert (record.state, record.started_from) == (VmState.READY, "restored")
    assert parts.leftovers() == NOTHING


def test_a_create_deleted_while_the_images_are_built_still_leaves_a_snapshot_made(parts: Parts) -> None:
    """With snapshots on, the first create starts the snapshot; deleted before its kernel and image were
    there (as the session bench does), it must not take the snapshot with it."""
    parts.build_done = built = threading.Event()

    async def scenario() -> None:
        manager = parts.manager(restore_by_default=True)
        record, _ = await manager.start("ann")
        assert await manager.destroy(record.vm_id)
        built.set()
        deadline = time.monotonic() + DEADLINE
        while await manager.snapshot_of() is None:
            assert time.monotonic() < deadline, "no snapshot was made"
            await asyncio.sleep(0.05)
        await manager.close()

    asyncio.run(scenario())
    assert parts.leftovers()["vmms"] == [] and parts.driver.saved
