"""A warm pool: VMs restored from the snapshot and kept ready, so a request takes one in milliseconds.

Pooled VMs are ordinary VMs of the user POOL_USER (they count against the host's limit, show in
`vm ls`, and the doctor sees them), marked `in_pool` on their record by the pool's own create: the
pool knows its VMs by that flag, never by the name (which no request may use either). `claim`
gives the oldest ready one to a user with a compare-and-set on its record (two requests never get
the same VM; a VM being destroyed is never handed out); the caller falls back to a restore, then
a cold boot, when the pool is empty.
The pool's own task keeps it full in the background: it makes the snapshot first if there is
none, replaces VMs that were claimed or died, recycles those older than `max_age`, and never
holds more than `memory_mib` of VM memory.

There is one pool per template that has one (`--pool desktop=4,oauth=2`): each keeps VMs of its
template (its image, its size), knows its own by the record's `template`, and serves only requests
for that template.

A claim gives the VM new viewer tokens (a new viewer epoch) and a new agent key (its config disk
rewritten; the agent checks each request against the disk's key, so the new key works at
once and the old one stops). It keeps the VNC password it was restored with: only the proxy ever
used it, and a new one would race the first viewer against the guest taking it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from browservm.errors import BrowserVMError
from browservm.vm.records import OPERATORS, Owner, Purpose, VmRecord, VmRecords
from browservm.vm.state import VmState

log = logging.getLogger(__name__)

POOL_USER = "browservm-pool"
OVERHEAD_MIB = 256  # counted per pooled VM beside its memory: the VMM's own
_RECHECK_S = 30.0  # for ages: nothing else wakes the pool when a VM grows old


@dataclass(frozen=True)
class PoolSettings:
    size: int  # VMs kept ready
    max_age: float  # seconds before a pooled VM is recycled
    memory_mib: int  # at most this much VM memory pooled
    vcpus: int = 1
    mem_mib: int = 1024
    template: str = "default"  # whose VMs it keeps, and whose requests it serves
    # A claim's refill waits this long: a restore competes for the CPUs with the VM just handed out,
    # whose x11vnc is answering its user's first viewer (measured on 2 cores: pool claim -> viewer
    # connected 0.29 s with the refill at once, 0.18 s with it 3 s later).
    refill_delay: float = 3.0

    @property
    def target(self) -> int:
        return min(self.size, self.memory_mib // (self.mem_mib + OVERHEAD_MIB))


class PoolManager(Protocol):
    """What the pool needs of the VM manager (VMManager is the real one)."""

    async def all(self) -> list[VmRecord]: ...

    async def create(self, user: str = ..., vcpus: int | None = ..., mem_mib: int | None = ..., *,
                     restore: bool = ..., purpose: Purpose = ..., template: str = ...) -> VmRecord: ...

    async def destroy(self, vm_id: str, *, ended_reason: str = ...) -> bool: ...

    async def snapshot(self, vcpus: int = ..., mem_mib: int = ..., template: str = ...) -> object: ...

    async def new_agent_key(self, vm_id: str) -> None: ...


@dataclass
class PoolStats:
    hits: int = 0
    misses: int = 0
    claim_seconds: float = 0.0  # the last claim's


class WarmPool:
    def __init__(self, manager: PoolManager, records: VmRecords, settings: PoolSettings,
                 max_per_user: Callable[[], int], clock: Callable[[], float] = time.time) -> None:
        self._manager = manager
        self._records = records
        self.settings = settings
        self._max_per_user = max_per_user
        self._clock = clock
        self._changed = asyncio.Event()  # the pool should look again: a claim, a death
        self._refill_at = 0.0  # loop time: not before (settings.refill_delay after the last claim)
        self._news = asyncio.Event()  # anything happened to a pooled VM (wait_filled)
        self.stats = PoolStats()
        self.on_claim: Callable[[bool, float], None] | None = None  # told of each claim: hit?, seconds

    def fits(self, vcpus: int, mem_mib: int) -> bool:
        return self.settings.target > 0 and (vcpus, mem_mib) == (self.settings.vcpus, self.settings.mem_mib)

    def _mine(self, record: VmRecord) -> bool:
        return record.in_pool and record.template == self.settings.template

    def notice(self, record: VmRecord, event: str) -> None:
        """The manager's news of a VM: a pooled one of this pool's that failed or went is replaced."""
        if not self._mine(record):
            return
        self._news.set()
        if event in ("failed", "ended", "destroyed"):
            self._changed.set()

    async def claim(self, user: str, owner: Owner = OPERATORS) -> VmRecord | None:
        """A ready pooled VM, now `user`'s and `owner`'s (its record saved), or None: the pool is empty.
        LimitExceeded if the user or tenant is at a limit."""
        started = time.monotonic()
        candidates = sorted((r for r in await self._manager.all() if self._mine(r) and r.state == VmState.READY),
                            key=lambda r: r.created_at)
        for record in candidates:
            claimed = await asyncio.to_thread(self._take, record, user, owner)
            if claimed is not None:
                try:
                    await self._manager.new_agent_key(claimed.vm_id)
                except (BrowserVMError, OSError) as exc:
                    log.warning("warm pool: %s claimed, but its agent key could not be changed: %s", claimed.vm_id,
                                exc)
                    self._changed.set()  # it is no longer the pool's: notice() will not tell of its end
                    try:
                        await self._manager.destroy(claimed.vm_id)
                    except BrowserVMError as failed:  # the user still gets a VM: the next one, or a new one
                        log.warning("warm pool: %s could not be destroyed: %s", claimed.vm_id, failed)
                    continue
                self.stats.hits += 1
                self.stats.claim_seconds = time.monotonic() - started
                self._refill_at = asyncio.get_running_loop().time() + self.settings.refill_delay
                self._changed.set()
                if self.on_claim is not None:
                    self.on_claim(True, self.stats.claim_seconds)
                return claimed
        self.stats.misses += 1
        if self.on_claim is not None:
            self.on_claim(False, time.monotonic() - started)
        return None

    def _take(self, record: VmRecord, user: str, owner: Owner) -> VmRecord | None:
        record.user, record.started_from, record.in_pool = user, "pooled", False
        owner.apply(record, time.time())
        record.viewer_epoch = secrets.token_hex(8)  # no viewer token made before the claim opens it
        return record if self._records.claim(record, POOL_USER, self._max_per_user(), owner.quota) else None

    async def run(self) -> None:
        """Keep the pool full until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            self._changed.clear()
            if (delay := self._refill_at - loop.time()) > 0:
                await asyncio.sleep(delay)  # a time, not a condition: see PoolSettings.refill_delay
            try:
                await self._refill()
            except BrowserVMError as exc:
                log.warning("warm pool: %s", exc)
            # asyncio.timeout, not wait_for: wait_for in 3.11 can swallow a cancel that arrives as the
            # event is set (a claim at shutdown), and the pool would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_RECHECK_S):
                    await self._changed.wait()

    async def _refill(self) -> None:
        mine = [r for r in await self._manager.all() if self._mine(r)]
        now = self._clock()
        for record in mine:
            old = record.state == VmState.READY and now - record.created_at > self.settings.max_age
            if old or record.state in (VmState.FAILED, VmState.ENDED):
                log.info("warm pool: %s %s", "recycling" if old else "removing", record.vm_id)
                await self._manager.destroy(record.vm_id)
        live = [r for r in mine if r.state in (VmState.CREATING, VmState.BOOTING, VmState.READY)
                and now - r.created_at <= self.settings.max_age]
        if len(live) >= self.settings.target:
            return
        await self._manager.snapshot(self.settings.vcpus, self.settings.mem_mib, self.settings.template)
        for _ in range(self.settings.target - len(live)):
            record = await self._manager.create(vcpus=self.settings.vcpus, mem_mib=self.settings.mem_mib, restore=True,
                                                purpose="pool", template=self.settings.template)
            if record.state != VmState.READY:
                failure = record.failure
                log.warning("warm pool: %s failed at %s: %s", record.vm_id, failure.hop if failure else "?",
                            failure.reason if failure else "")
                await self._manager.destroy(record.vm_id)
                return  # try again at the next wake-up, not in a tight loop

    async def wait_filled(self, timeout: float) -> bool:
        """Until the pool holds its target of ready VMs (for tests and benchmarks), woken by its VMs' news."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self._news.clear()
            ready = [r for r in await self._manager.all() if self._mine(r) and r.state == VmState.READY]
            if len(ready) >= self.settings.target:
                return True
            try:
                async with asyncio.timeout_at(deadline):
                    await self._news.wait()
            except TimeoutError:
                return False

