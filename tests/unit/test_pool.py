"""The warm pool with the fake VMM: claims, fallbacks, refills, deaths, ages, the memory budget."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from browservm.errors import InvalidInput, LimitExceeded
from browservm.vm.manager import VMManager
from browservm.vm.parts import Limits
from browservm.vm.pool import OVERHEAD_MIB, POOL_USER, PoolSettings, WarmPool
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmdir import CONFIG_DISK
from browservm.vmm import process
from browservm.vmm.process import VmmProcess

from .fakes import Parts

DEADLINE = 20.0
REFILL_DELAY = 0.5


@asynccontextmanager
async def pooled(parts: Parts, size: int = 2, memory_mib: int = 8192,
                 clock: list[float] | None = None) -> AsyncIterator[tuple[VMManager, WarmPool]]:
    settings = PoolSettings(size=size, max_age=600, memory_mib=memory_mib, refill_delay=REFILL_DELAY)
    now = clock if clock is not None else []
    manager = parts.manager(limits=Limits(max_vms=8, max_vms_per_user=2), restore_by_default=True,
                            pool=lambda vms: WarmPool(vms, VmRecords(parts.store), settings, max_per_user=lambda: 2,
                                                      clock=(lambda: now[0]) if now else time.time))
    pool = manager.pool
    assert pool is not None
    running = asyncio.create_task(pool.run())
    try:
        yield manager, pool
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await manager.close()


def test_a_claim_takes_a_ready_pooled_vm_then_the_pool_refills(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            snapshot = await manager.snapshot_of()
            assert snapshot is not None  # made first: pooled VMs are restored
            pooled_vms = {r.vm_id: r for r in await manager.all() if r.user == POOL_USER}
            keys = {vm_id: manager.secrets(vm_id) for vm_id in pooled_vms}
            claimed_at = time.time()
            record, task = await manager.start("ann")
            assert await asyncio.wait_for(task, 1) is record and record.vm_id in pooled_vms
            assert (record.user, record.started_from, record.state) == ("ann", "pooled", VmState.READY)
            stored = await manager.get(record.vm_id)
            assert stored is not None and stored.user == "ann" and stored.viewer_epoch == record.viewer_epoch
            assert record.viewer_epoch != pooled_vms[record.vm_id].viewer_epoch  # no earlier viewer token works
            # A new agent key for the claimed VM; its desktop password stays (only the proxy ever had it).
            now = manager.secrets(record.vm_id)
            before = keys[record.vm_id]
            assert now["agent"] != before["agent"] and len(now["agent"]) == 64 and now["vnc"] == before["vnc"]
            assert pool.stats.hits == 1
            assert await pool.wait_filled(DEADLINE)
            now_pooled = [r for r in await manager.all() if r.user == POOL_USER]
            assert len(now_pooled) == 2
            # The refill left the claimed VM its first moments: it began no sooner than refill_delay after.
            [refill] = [r for r in now_pooled if r.vm_id not in pooled_vms]
            assert refill.created_at - claimed_at >= REFILL_DELAY
    asyncio.run(scenario())


def test_a_claimed_vm_whose_key_cannot_be_changed_is_not_handed_out(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts, size=1) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            [broken] = [r for r in await manager.all() if r.user == POOL_USER]
            (Path(broken.directory) / CONFIG_DISK).unlink()
            record, task = await manager.start("ann")
            record = await asyncio.wait_for(task, DEADLINE)
            assert record.vm_id != broken.vm_id and record.started_from != "pooled"  # fell back to a restore
            gone = await manager.get(broken.vm_id)
            assert gone is None or gone.state != VmState.READY  # destroyed, not left to anyone
            assert await pool.wait_filled(DEADLINE)  # refilled at once, not at the next age check
    asyncio.run(scenario())


def test_two_claims_at_once_never_get_the_same_vm_and_an_empty_pool_falls_back(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts, size=1) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            (a, _), (b, b_task) = await asyncio.gather(manager.start("ann"), manager.start("bob"))
            assert a.vm_id != b.vm_id
            assert sorted([a.started_from, b.started_from]) == ["pooled", "restored"]
            assert (await asyncio.wait_for(b_task, DEADLINE)).state == VmState.READY
            assert (pool.stats.hits, pool.stats.misses) == (1, 1)
    asyncio.run(scenario())


def test_a_pooled_vm_that_dies_is_replaced(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts, size=1) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            victim = next(r for r in await manager.all() if r.user == POOL_USER)
            assert victim.pid is not None and victim.pid_start_time is not None
            process.signal_process(VmmProcess(victim.pid, victim.pid_start_time), signal.SIGKILL)
            async with asyncio.timeout(DEADLINE):
                while True:
                    ready = [r for r in await manager.all() if r.user == POOL_USER and r.state == VmState.READY]
                    if ready and victim.vm_id not in {r.vm_id for r in ready}:
                        break
                    await pool.wait_filled(1)
            assert await manager.get(victim.vm_id) is None  # removed, not left failed
    asyncio.run(scenario())


def test_the_pool_never_holds_more_memory_than_its_budget(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts, size=5, memory_mib=2 * (1024 + OVERHEAD_MIB) + 100) as (manager, pool):
            assert pool.settings.target == 2
            assert await pool.wait_filled(DEADLINE)
            await asyncio.sleep(0.2)  # a pool that overshot would be making a third one now
            assert len([r for r in await manager.all() if r.user == POOL_USER]) == 2
    asyncio.run(scenario())


def test_a_pooled_vm_past_its_age_is_recycled(parts: Parts) -> None:
    async def scenario() -> None:
        clock = [time.time()]
        async with pooled(parts, size=1, clock=clock) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            old = next(r for r in await manager.all() if r.user == POOL_USER)
            clock[0] += 601
            pool.notice(old, "destroyed")  # any news wakes the pool, which then looks at ages
            async with asyncio.timeout(DEADLINE):
                while await manager.get(old.vm_id) is not None:
                    await pool.wait_filled(1)
    asyncio.run(scenario())


def test_the_pool_knows_its_vms_by_their_mark_never_by_the_user_name(parts: Parts) -> None:
    """A VM with the pool's user name but no mark (forged, or a record from before the mark) is
    never claimed nor refilled as the pool's, and counts against its user's limit like any other."""
    async def scenario() -> None:
        async with pooled(parts, size=1) as (manager, pool):
            assert await pool.wait_filled(DEADLINE)
            [marked] = [r for r in await manager.all() if r.in_pool]
            assert marked.user == POOL_USER
            forged = VmRecord(vm_id="vm-forged", user=POOL_USER, vcpus=1, mem_mib=1024, directory="",
                              state=VmState.READY, created_at=0.0)  # older: a claim would take it first
            VmRecords(parts.store).insert(forged, max_total=8, max_per_user=8)
            _, task = await manager.start("ann")
            assert (await asyncio.wait_for(task, 1)).vm_id == marked.vm_id
            stored = await manager.get(marked.vm_id)
            assert stored is not None and not stored.in_pool and stored.user == "ann"
            assert await pool.wait_filled(DEADLINE)  # a new marked VM: the forged one did not count
            assert {r.vm_id for r in await manager.all() if r.in_pool} - {marked.vm_id} != set()
            assert not VmRecords(parts.store).claim(forged, POOL_USER, 8)  # the store refuses it too
            with pytest.raises(LimitExceeded, match="max_vms_per_user"):
                VmRecords(parts.store).insert(
                    VmRecord(vm_id="vm-third", user=POOL_USER, vcpus=1, mem_mib=1024, directory=""),
                    max_total=8, max_per_user=1)
    asyncio.run(scenario())


def test_a_request_cannot_create_a_vm_under_a_reserved_name(parts: Parts) -> None:
    async def scenario() -> None:
        async with pooled(parts, size=1) as (manager, pool):
            for name in ("BrowserVM-Pool", "browservm-snapshot", "\uff42rowservm-pool "):
                with pytest.raises(InvalidInput) as excinfo:
                    await manager.start(name)
                assert excinfo.value.field == "user" and "reserved" in excinfo.value.reason
            assert await pool.wait_filled(DEADLINE)
            assert all(r.in_pool for r in await manager.all() if r.user == POOL_USER)
    asyncio.run(scenario())
