"""The manager's orchestration against fakes: refusals, limits, undo on failure, and what a server
needs of it: a loop that never stalls, cancellation that leaves nothing, conditional writes.

The fakes stand in for the TAPs and the guest; the "VMM" is a real process (`sleep`), so exit
watching and stopping are real. What the fakes stand in for is tested for real in tests/integration.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from browservm.errors import HostNetworkError, InvalidInput, LimitExceeded, StateConflict
from browservm.ipam import Lease
from browservm.store import Store
from browservm.vm import hops
from browservm.vm.image_source import Images
from browservm.vm.parts import Limits
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState

from .fakes import NOTHING, FakeProbes, Parts


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"vcpus": 0}, "vcpus"), ({"vcpus": 64}, "vcpus"), ({"mem_mib": 16}, "mem_mib"), ({"user": ""}, "user"),
    ({"vcpus": True}, "vcpus"), ({"mem_mib": 1024.5}, "mem_mib"),
])
def test_bad_requests_are_refused_before_anything_is_allocated(
        parts: Parts, kwargs: dict[str, object], field: str) -> None:
    manager = parts.manager()
    with pytest.raises(InvalidInput) as excinfo:
        asyncio.run(manager.create(**kwargs))  # type: ignore[arg-type]
    assert excinfo.value.field == field
    assert asyncio.run(manager.all()) == [] and parts.leftovers() == NOTHING and parts.network.calls == []


def test_a_vm_passes_every_hop_in_the_order_of_the_one_vocabulary(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam)
    manager = parts.manager(probes)
    record = asyncio.run(manager.create())
    assert record.state == VmState.READY and record.owner == "" and record.desktop_path == "rfb"
    # Straight to the VNC server (Xvnc, or the minimal image's x11vnc): no WebSocket upgrade on the way.
    assert tuple(record.stages) == tuple(name for name in hops.NAMES if name != hops.WS_UPGRADE)
    assert (probes.listeners, probes.port, probes.websocket) == (("xvnc", "x11vnc"), 5901, False)
    assert asyncio.run(manager.destroy(record.vm_id)) and parts.leftovers() == NOTHING


def test_on_the_websockify_path_a_vm_passes_the_upgrade_too_and_keeps_its_path(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam)
    record = asyncio.run(parts.manager(probes, desktop_path="websockify").create())
    assert tuple(record.stages) == hops.NAMES and record.desktop_path == "websockify"
    assert (probes.listeners, probes.port, probes.websocket) == (("websockify",), 6080, True)
    # The record, not the manager's setting, decides how this VM is reached from now on.
    stored = asyncio.run(parts.manager(probes).get(record.vm_id))
    assert stored is not None and stored.desktop_path == "websockify"
    assert asyncio.run(parts.manager().destroy(record.vm_id)) and parts.leftovers() == NOTHING


def test_an_unknown_desktop_path_is_refused_by_name(parts: Parts) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        parts.manager(desktop_path="vnc")
    assert excinfo.value.field == "desktop_path" and "rfb, websockify" in excinfo.value.reason


def test_a_failed_start_releases_everything_and_names_its_own_stage(parts: Parts) -> None:
    parts.driver.fail_start = True
    manager = parts.manager()
    record = asyncio.run(manager.create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert (record.failure.hop, record.failure.reason) == ("vmm.spawn",
                                                          "cannot run fake-vmm: No such file or directory")
    assert list(record.stages) == ["net.lease", "net.tap", "disk.clone"]
    assert parts.network.calls == [f"add {record.vm_id}", f"remove {record.vm_id}"]
    assert parts.leftovers() == NOTHING and not record.holds_resources


def test_an_os_error_is_a_failure_of_its_stage_with_the_reason_not_a_traceback(parts: Parts) -> None:
    parts.images = Images(parts.images.kernel, parts.images.rootfs, disk_template=parts.vm_root.parent)  # a dir
    record = asyncio.run(parts.manager().create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert record.failure.hop == "disk.clone"
    assert "Is a directory" in record.failure.reason and record.failure.hint
    assert parts.leftovers() == NOTHING


def test_a_vm_whose_disk_could_not_fill_up_is_refused_at_disk_clone(parts: Parts) -> None:
    big = parts.vm_root.parent / "huge-template.ext4"
    with big.open("wb") as template:
        template.truncate(2**43)  # sparse: 8 TiB, more than this file system holds
    parts.images = Images(parts.images.kernel, parts.images.rootfs, disk_template=big)
    record = asyncio.run(parts.manager().create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert record.failure.hop == "disk.clone"
    assert record.failure.reason.startswith("No space left on device for this VM's disk: ")
    assert "this one by 8192.0 GiB" in record.failure.reason
    assert parts.leftovers() == NOTHING


def test_a_host_network_error_fails_at_net_tap(parts: Parts) -> None:
    def refuse(lease: Lease) -> None:
        raise HostNetworkError("attach to br0", "bridge br0 does not exist; run `browservm host up`")
    parts.network.add_tap = refuse  # type: ignore[method-assign]
    record = asyncio.run(parts.manager().create())
    assert record.failure is not None and record.failure.hop == "net.tap"
    assert "bridge br0 does not exist" in record.failure.reason


def test_a_failing_probe_names_its_hop_and_the_vmm_is_stopped(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam, fail={"ws.upgrade": "expected '101 Switching Protocols', got 'HTTP/1.1 200'"})
    record = asyncio.run(parts.manager(probes, desktop_path="websockify").create())
    assert record.failure is not None and record.failure.hop == "ws.upgrade"
    assert probes.closed == 1  # the desktop connection was closed
    assert parts.leftovers() == NOTHING


def test_keep_failed_keeps_the_resources_for_diagnosis(parts: Parts) -> None:
    parts.driver.fail_start = True
    manager = parts.manager()
    record = asyncio.run(manager.create(keep_failed=True))
    assert record.state == VmState.FAILED and record.holds_resources
    assert parts.network.taps == {record.vm_id} and [lease.vm_id for lease in parts.ipam.leases()] == [record.vm_id]
    assert (parts.vm_root / record.vm_id / "overlay.ext4").exists()
    assert asyncio.run(manager.destroy(record.vm_id))
    assert parts.leftovers() == NOTHING


def test_limits_count_vms_that_hold_resources(parts: Parts) -> None:
    parts.driver.fail_start = True
    manager = parts.manager()
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


# --- what a server needs ------------------------------------------------------------------------

class _SlowSteps(logging.Handler):
    """Collects asyncio's debug-mode reports of loop steps that ran longer than slow_callback_duration."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("Executing") and record.args:
            self.steps.append(record.getMessage())


def _slow_steps(work: Callable[[], Awaitable[object]]) -> list[str]:
    """Run `work` in a debug event loop; each step that held the loop over 50 ms, and for how long.

    A step is code between two awaits: a blocking call inside one holds the whole loop. Measuring
    steps, not heartbeat gaps, keeps a machine busy with other work from looking like our stall.
    """
    slow = _SlowSteps()
    logger = logging.getLogger("asyncio")
    logger.addHandler(slow)
    try:
        async def run() -> None:
            asyncio.get_running_loop().slow_callback_duration = 0.05
            await work()
        asyncio.run(run(), debug=True)
    finally:
        logger.removeHandler(slow)
    return slow.steps


def test_nothing_blocks_the_event_loop_while_a_vm_is_created_and_destroyed(parts: Parts) -> None:
    # Every blocking step made slow, as image resolution, the KVM probe, netlink and spawning can be.
    parts.network.block = parts.driver.block = 0.2
    created: list[VmRecord] = []

    async def create_and_destroy() -> None:
        manager = parts.manager(images_delay=0.3)
        created.append(await manager.create())
        await manager.destroy(created[-1].vm_id)

    # A blocking call holds the loop on every run; a step merely descheduled by a busy machine (CI runs
    # this inside a chroot beside other work) seldom twice: so a step is only slow if both runs say so.
    slow_steps = _slow_steps(create_and_destroy)
    if slow_steps:
        slow_steps = _slow_steps(create_and_destroy)
    assert [record.state for record in created] == [VmState.READY] * len(created)
    assert slow_steps == [], "steps held the event loop over 50 ms:\n" + "\n".join(slow_steps)
    assert parts.leftovers() == NOTHING


def _open_fds() -> dict[str, str]:
    """This process's open descriptors and what each is (a socket, an anon inode: inotify, pidfd, ...)."""
    gc.collect()
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:  # the descriptor listdir itself used
            continue
    return found


@pytest.mark.parametrize("hop", ["guest.network", "net.arp", "desktop.ready", "rfb.banner",
                                 "desktop.complete"])
def test_cancelling_a_create_during_a_hop_leaves_nothing_running(parts: Parts, hop: str) -> None:
    probes = FakeProbes(parts.ipam)
    manager = parts.manager(probes)
    fds_before = _open_fds()

    async def cancel_during_hop() -> tuple[VmRecord, set[asyncio.Task[Any]]]:
        probes.hang_at(hop)
        creating = asyncio.ensure_future(manager.create())
        await probes.reached[hop].wait()
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating
        [record] = await manager.all()
        return record, {task for task in asyncio.all_tasks() if task is not asyncio.current_task()}

    record, tasks = asyncio.run(cancel_during_hop())
    assert probes.cancelled == [hop]  # the probe itself was cancelled, not abandoned
    assert tasks == set(), tasks
    assert _open_fds() == fds_before  # no socket, inotify watch or pidfd survived
    assert record.state == VmState.FAILED and record.failure is not None
    assert (record.failure.hop, record.failure.reason) == ("controller", f"cancelled during {hop}")
    assert not record.holds_resources and parts.leftovers() == NOTHING


def test_cancelling_a_create_while_a_blocking_stage_runs_undoes_what_that_stage_made(parts: Parts) -> None:
    parts.network.block = 0.3
    manager = parts.manager()

    async def cancel_while_the_tap_is_made() -> None:
        creating = asyncio.ensure_future(manager.create())
        while not parts.ipam.leases():
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # inside add_tap's blocking call now
        creating.cancel()
        with pytest.raises(asyncio.CancelledError):
            await creating

    asyncio.run(cancel_while_the_tap_is_made())
    assert parts.network.calls[0].startswith("add ")  # the TAP was made after all ...
    assert parts.leftovers() == NOTHING  # ... and removed


def test_a_destroy_cancelled_once_it_marked_the_vm_still_releases_everything(
        parts: Parts, monkeypatch: pytest.MonkeyPatch) -> None:
    """A login's VM released as the controller stops: the stop cancels the release just after the VM was
    marked destroying. Marked, it is no longer live, so nothing else would ever release it."""
    manager = parts.manager()
    marked, go_on = threading.Event(), threading.Event()
    save = VmRecords.save

    def slow_mark(records: VmRecords, record: VmRecord) -> None:
        save(records, record)
        if record.state == VmState.DESTROYING:
            marked.set()
            assert go_on.wait(30), "the test never let the mark end"

    monkeypatch.setattr(VmRecords, "save", slow_mark)

    async def cancel_once_marked() -> VmRecord:
        record = await manager.create()
        destroying = asyncio.ensure_future(manager.destroy(record.vm_id))
        assert await asyncio.to_thread(marked.wait, 30)
        destroying.cancel()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await destroying
        return record

    record = asyncio.run(cancel_once_marked())
    assert asyncio.run(manager.get(record.vm_id)) is None
    assert parts.leftovers() == NOTHING


def test_a_failing_undo_never_loses_the_record_and_it_keeps_counting_until_released(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam, fail={"net.arp": "no ARP reply"})
    parts.network.remove_fails = True
    manager = parts.manager(probes, limits=Limits(max_vms=1, max_vms_per_user=1))
    record = asyncio.run(manager.create())
    assert record.state == VmState.FAILED and record.failure is not None
    assert (record.failure.hop, record.failure.reason) == ("net.arp", "no ARP reply")
    assert len(record.failure.cleanup) == 1 and record.failure.cleanup[0].startswith("tap: ")
    assert "Device or resource busy" in record.failure.cleanup[0]
    stored = asyncio.run(manager.get(record.vm_id))
    assert stored is not None and stored.state == VmState.FAILED and stored.holds_resources
    assert parts.driver.alive() == []  # what could be released was
    with pytest.raises(LimitExceeded):  # its TAP is still there: it still counts
        asyncio.run(manager.create())
    parts.network.remove_fails = False
    assert asyncio.run(manager.destroy(record.vm_id))
    assert parts.leftovers() == NOTHING


def test_a_destroy_from_another_process_wins_over_a_create_in_flight(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam)
    creator = parts.manager(probes)
    other = parts.manager()
    other._me = "1:1"  # another controller process

    async def race() -> None:
        release = probes.hang_at("rfb.banner")
        creating = asyncio.ensure_future(creator.create())
        await probes.reached["rfb.banner"].wait()
        [record] = await other.all()
        assert await other.destroy(record.vm_id)
        release.set()  # the creator's late `ready` must not bring the record back
        with pytest.raises(StateConflict, match="changed by someone else"):
            await creating

    asyncio.run(race())
    assert asyncio.run(creator.all()) == [] and parts.leftovers() == NOTHING


def test_a_reconcile_never_frees_a_vm_that_a_live_process_is_creating(parts: Parts) -> None:
    probes = FakeProbes(parts.ipam)
    creator = parts.manager(probes)
    restarted = parts.manager()
    restarted._me = "1:1"

    async def reconcile_meanwhile() -> list[str]:
        release = probes.hang_at("guest.network")
        creating = asyncio.ensure_future(creator.create())
        await probes.reached["guest.network"].wait()
        actions = await restarted.reconcile()
        assert parts.network.taps and parts.ipam.leases() and parts.driver.alive()  # untouched
        release.set()
        record = await creating
        assert record.state == VmState.READY
        await restarted.close()
        return actions

    actions = asyncio.run(reconcile_meanwhile())
    assert len(actions) == 1 and "by process" in actions[0] and "left to it" in actions[0]


def _as_left_by_a_dead_creator(parts: Parts, record: VmRecord, state: VmState) -> None:
    """Rewrite a kept record as a crash would have left it: mid-create, owned by a process that is gone."""
    stored = VmRecords(parts.store).get(record.vm_id)
    assert stored is not None
    stored.state, stored.owner, stored.failure, stored.keep = state, "999999:1", None, False
    VmRecords(parts.store).save(stored)


def test_a_booting_vm_whose_creator_died_is_adopted_and_finishes_readiness(parts: Parts) -> None:
    record = asyncio.run(parts.manager(FakeProbes(parts.ipam, fail={"net.arp": "x"})).create(keep_failed=True))
    _as_left_by_a_dead_creator(parts, record, VmState.BOOTING)  # its VMM still runs
    restarted = parts.manager()

    async def reconcile() -> tuple[list[str], VmRecord | None]:
        actions = await restarted.reconcile()
        while (current := await restarted.get(record.vm_id)) is not None and current.state == VmState.BOOTING:
            await asyncio.sleep(0.01)
        await restarted.close()
        return actions, current

    actions, current = asyncio.run(reconcile())
    assert actions == [f"{record.vm_id}: VMM {record.pid} alive, its creator gone: adopted, resuming readiness"]
    assert current is not None and current.state == VmState.READY and current.owner == ""
    assert asyncio.run(restarted.destroy(record.vm_id)) and parts.leftovers() == NOTHING


def test_a_vm_whose_creator_died_before_its_vmm_ran_is_failed_and_released(parts: Parts) -> None:
    parts.driver.fail_start = True
    record = asyncio.run(parts.manager().create(keep_failed=True))
    _as_left_by_a_dead_creator(parts, record, VmState.CREATING)
    restarted = parts.manager()
    [action] = asyncio.run(restarted.reconcile())
    assert action.startswith(f"{record.vm_id}: the process creating it (999999:1) stopped during vmm.spawn")
    current = asyncio.run(restarted.get(record.vm_id))
    assert current is not None and current.state == VmState.FAILED and current.failure is not None
    assert current.failure.hop == "controller" and not current.holds_resources
    assert parts.leftovers() == NOTHING


def test_reconcile_removes_orphans_but_not_what_a_record_holds(parts: Parts) -> None:
    manager = parts.manager()
    record = asyncio.run(manager.create())
    parts.network.taps.add("vm-orphan")
    parts.ipam.lease("vm-orphan2")
    (parts.vm_root / "vm-orphan3").mkdir()
    actions = asyncio.run(manager.reconcile())
    assert sorted(a.split(" ")[1] for a in actions if a.startswith("removed")) == ["orphan"] * 3
    assert parts.network.taps == {record.vm_id} and [lease.vm_id for lease in parts.ipam.leases()] == [record.vm_id]
    assert asyncio.run(manager.destroy(record.vm_id)) and parts.leftovers() == NOTHING


def test_variants_of_one_user_name_share_one_per_user_limit(parts: Parts) -> None:
    parts.driver.fail_start = True
    manager = parts.manager()
    for variant in ("Ann", " ann "):
        record = asyncio.run(manager.create(user=variant, keep_failed=True))
        assert record.user == "ann"
    with pytest.raises(LimitExceeded, match="user 'ann' already has 2 VMs"):
        asyncio.run(manager.create(user="\uff21\uff2e\uff2e"))  # "ANN" in full-width letters: NFKC makes them "ANN"
    with pytest.raises(InvalidInput) as excinfo:
        asyncio.run(manager.create(user="   "))
    assert excinfo.value.field == "user"


@pytest.mark.parametrize("word", ["init=/bin/sh", "root=/dev/vdb", "rw", "--", "systemd.debug_shell=1",
                                  "systemd.unit=emergency.target", "console=tty0", "single"])
def test_extra_boot_arguments_are_an_allowlist(parts: Parts, word: str) -> None:
    manager = parts.manager()
    with pytest.raises(InvalidInput) as excinfo:
        asyncio.run(manager.create(extra_boot_args=(word,)))
    assert excinfo.value.field == "extra" and "not an allowed extra kernel argument" in excinfo.value.reason
    assert parts.leftovers() == NOTHING


def test_allowed_extra_boot_arguments_pass(parts: Parts) -> None:
    parts.manager().check_request("ann", 1, 1024, ("browservm.net=off", "loglevel=7"))


@pytest.mark.parametrize("step", hops.RESOURCES)
def test_a_create_that_fails_right_after_any_resource_step_leaves_nothing_behind(parts: Parts, step: str) -> None:
    # Each step's undo is found by the one release path from what the step wrote into the record.
    def fail_after(stage: str, seconds: float) -> None:
        if stage == step:
            raise OSError(28, "No space left on device")

    record = asyncio.run(parts.manager().create(on_stage=fail_after))
    assert record.state == VmState.FAILED and record.failure is not None
    assert list(record.stages)[-1] == step and "No space left on device" in record.failure.reason
    assert parts.leftovers() == NOTHING and not record.holds_resources
