"""The audit trail: every state-changing request, viewer connect and disconnect, login capture and
credentials read, with when, which key (its id, never the key), which tenant, what, on what, the outcome.

Append-only: an UPDATE is refused by the database itself (a trigger, store.py); rows leave only by
age (`retention_s`). Writes are group-committed by one writer task: under a burst, one transaction
takes every entry waiting, so 200 concurrent creates cost a few commits, not 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from browservm.api.logs import REQUEST_ID
from browservm.errors import BrowserVMError, StateError
from browservm.store import Store

log = logging.getLogger("browservm.audit")
MAX_QUERY = 1000
_BATCH = 500
_PRUNE_EVERY_S = 3600.0


@dataclass(frozen=True)
class AuditEntry:
    key_id: str  # "" for a viewer (its link's token is no key)
    tenant: str
    action: str  # e.g. "POST /v1/vms", "viewer.connect", "login.captured"
    target: str  # the VM, login, key, user/provider it acted on; "" when none
    outcome: str  # the HTTP status, a close code, "captured"
    detail: str = ""
    at: float = field(default_factory=time.time)
    request_id: str = field(default_factory=lambda: REQUEST_ID.get() or "")


@dataclass(frozen=True)
class AuditRow(AuditEntry):
    id: int = 0


class AuditTrail:
    def __init__(self, store: Store, retention_s: float) -> None:
        self._store = store
        self.retention_s = retention_s
        self._queue: asyncio.Queue[tuple[AuditEntry, asyncio.Future[None]]] = asyncio.Queue()
        self._writing = False

    async def record(self, entry: AuditEntry) -> None:
        """Returns once the entry is committed; StateError if it cannot be."""
        if not self._writing:  # before run() started or after it ended: written alone
            await asyncio.to_thread(self._write, [entry])
            return
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((entry, done))
        await done

    async def run(self) -> None:
        """Write what is recorded, in batches, and prune by age, until cancelled."""
        pruned_at = 0.0
        self._writing = True
        try:
            while True:
                batch = [await self._queue.get()]
                while len(batch) < _BATCH and not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                await self._commit(batch)
                if time.time() - pruned_at > _PRUNE_EVERY_S:
                    pruned_at = time.time()
                    removed = await asyncio.to_thread(self.prune, pruned_at)
                    if removed:
                        log.info("audit: %d entries older than %.0f s removed", removed, self.retention_s)
        finally:
            self._writing = False
            waiting = []
            while not self._queue.empty():
                waiting.append(self._queue.get_nowait())
            if waiting:  # cancelled with entries queued: they are still written, in this thread
                self._settle(waiting, self._guarded_write(waiting))

    async def _commit(self, batch: list[tuple[AuditEntry, asyncio.Future[None]]]) -> None:
        try:
            await asyncio.to_thread(self._write, [entry for entry, _ in batch])
        except BrowserVMError as exc:
            self._settle(batch, exc)
        except asyncio.CancelledError:
            # Its thread may still commit it; the requests waiting for it are not left waiting for ever.
            self._settle(batch, StateError(str(self._store.path), "the controller stopped while writing them"))
            raise
        else:
            self._settle(batch, None)

    def _guarded_write(self, batch: list[tuple[AuditEntry, asyncio.Future[None]]]) -> BrowserVMError | None:
        try:
            self._write([entry for entry, _ in batch])
        except BrowserVMError as exc:
            return exc
        return None

    @staticmethod
    def _settle(batch: list[tuple[AuditEntry, asyncio.Future[None]]], error: BrowserVMError | None) -> None:
        if error is not None:
            log.error("audit: %d entries could not be written: %s", len(batch), error)
        for _, done in batch:
            if done.done():
                continue  # its request was cancelled meanwhile
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(None)

    def _write(self, entries: list[AuditEntry]) -> None:
        with self._store.transaction() as db:
            db.executemany("INSERT INTO audit (at, key_id, tenant, action, target, outcome, detail, request_id) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           [(e.at, e.key_id, e.tenant, e.action, e.target, e.outcome, e.detail, e.request_id)
                            for e in entries])

    def prune(self, now: float) -> int:
        with self._store.transaction() as db:
            return int(db.execute("DELETE FROM audit WHERE at < ?", (now - self.retention_s,)).rowcount)

    def query(self, *, since: float = 0.0, tenant: str | None = None, target: str | None = None,
              after_id: int = 0, limit: int = 100) -> list[AuditRow]:
        """Entries oldest first, from `since` and after the entry `after_id` (the cursor of a next page)."""
        rows = self._store.read(
            "SELECT id, at, key_id, tenant, action, target, outcome, detail, request_id FROM audit "
            "WHERE at >= ?1 AND id > ?2 AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR target = ?4) "
            "ORDER BY id LIMIT ?5", (since, after_id, tenant, target, min(limit, MAX_QUERY)))
        return [AuditRow(id=int(str(i)), at=float(str(at)), key_id=str(k), tenant=str(t), action=str(a),
                         target=str(g), outcome=str(o), detail=str(d), request_id=str(r))
                for i, at, k, t, a, g, o, d, r in rows]
