"""Sends each pending delivery to its receiver, signed, retrying with backoff, without holding anyone up.

A producer (a VM or login changing state) only calls `emit`: the event is queued in memory and the
deliverer woken. The deliverer, one task of the controller's, writes the queued events as deliveries and
the ended attempts' outcomes (one transaction for however many there are, on a thread of its own), then
starts each delivery that is due, within bounds:

    PER_WEBHOOK  attempts under way to one webhook
    PER_TENANT   attempts under way for one tenant, over all its webhooks
    OVERALL      attempts under way at once

so receivers that hang (each attempt ends at `timeout_s`) hold at most PER_TENANT of the OVERALL slots:
another tenant's deliveries go on. It waits on an asyncio.Event, woken by an emit or an attempt's end,
with a deadline at the next retry due. Deliveries are rows in the store: a controller that stops (or
crashes) resumes its pending ones at its next start; one whose attempt was cut short is attempted again
(at least once, not exactly once: receivers dedupe by X-Browservm-Delivery or the event's id).

A non-2xx answer, a timeout or no connection is a failed attempt; the next is `backoff_s` * 2^(n-1)
later (at most `max_backoff_s`); after `max_attempts` the delivery is failed. The webhook's other
deliveries wait as long (for its n-th failed round of attempts in a row), so a receiver that is down gets
one round of attempts per backoff however many events wait for it; its first success ends the wait.
Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import httpx

from browservm import __version__
from browservm.errors import BrowserVMError
from browservm.webhooks.events import Event
from browservm.webhooks.records import Due, Outcome, WebhookStore
from browservm.webhooks.signing import SIGNATURE_HEADER, sign

log = logging.getLogger("browservm.webhooks")
T = TypeVar("T")
PER_WEBHOOK = 2
PER_TENANT = 4
OVERALL = 32
MAX_QUEUED = 10_000  # events emitted and not yet written: past it the oldest is dropped (and logged)
_PRUNE_EVERY_S = 3600.0


class Deliverer:
    def __init__(self, records: WebhookStore, *, timeout_s: float = 5.0, backoff_s: float = 1.0,
                 max_backoff_s: float = 600.0, max_attempts: int = 12) -> None:
        self.records = records
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self._queued: deque[Event] = deque()
        self._outcomes: list[Outcome] = []  # attempts that ended, not yet written
        self._wake = asyncio.Event()
        self.started = False  # run() began (its end closes what it used)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._attempts: dict[int, asyncio.Task[None]] = {}  # by delivery id: those under way
        self._unwritten: set[int] = set()  # ended, outcome not yet written: still due in the store, not to start
        self._by_webhook: Counter[str] = Counter()
        self._by_tenant: Counter[str] = Counter()
        # A webhook whose receiver failed: its failures in a row, and until when all its deliveries wait.
        self._failing: dict[str, tuple[int, float]] = {}
        # The store's work runs on a thread of its own, one job at a time: a flood of attempts costs the
        # controller at most that thread, never the shared pool its requests' store reads wait in.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="browservm-webhooks")

    # --- what producers call ------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        """Queue `event` for its tenant's webhooks. Never blocks; after stop, the event is not sent."""
        if self._stopping:
            log.debug("webhooks: %s %s not sent: the controller is stopping", event.type, event.id)
            return
        if len(self._queued) >= MAX_QUEUED:
            lost = self._queued.popleft()
            log.warning("webhooks: %d events wait to be written; %s %s dropped", MAX_QUEUED, lost.type, lost.id)
        self._queued.append(event)
        self._wake.set()

    def poke(self) -> None:
        """Look again now (a webhook was enabled)."""
        self._wake.set()

    # --- life ---------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stop() (or cancellation); attempts cut short stay pending for the next start."""
        self.started = True
        pruned_at = 0.0
        try:
            async with httpx.AsyncClient(timeout=self.timeout_s, follow_redirects=False, trust_env=False,
                                         limits=httpx.Limits(max_connections=OVERALL),
                                         headers={"User-Agent": f"browservm-webhooks/{__version__}"}) as client:
                while not self._stopping:
                    self._wake.clear()
                    try:
                        deadline = await self._round(client)
                        if time.time() - pruned_at > _PRUNE_EVERY_S:
                            pruned_at = time.time()
                            await self._prune(pruned_at)
                    except Exception:
                        # Not the end of deliveries for good while the controller looks alive: logged, and
                        # the next round comes after a backoff.
                        log.exception("webhooks: a delivery round failed")
                        deadline = time.time() + self.backoff_s
                    timeout = None if deadline is None else max(0.0, deadline - time.time())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            await self._settle()

    async def stop(self) -> None:
        """Stop delivering: attempts under way are cut short (they stay pending), what ended is written."""
        self._stopping = True
        self._wake.set()
        if self.started:
            await self._stopped.wait()
        else:
            await self._settle()

    async def _settle(self) -> None:
        self._stopping = True
        attempts = list(self._attempts.values())
        for task in attempts:
            task.cancel()
        await asyncio.gather(*attempts, return_exceptions=True)
        try:
            await self._write()
        except BrowserVMError:
            pass  # logged by _write
        finally:
            self._thread.shutdown(wait=False)  # idle: every job of its was awaited
            self._stopped.set()

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, work, *args)

    # --- one round ----------------------------------------------------------------------------

    async def _round(self, client: httpx.AsyncClient) -> float | None:
        """Write what was queued and what ended, start what is due and fits the bounds; when the next retry
        is due (None: nothing waits)."""
        try:
            due, upcoming = await self._write(read=True)
        except BrowserVMError:
            return time.time() + self.backoff_s  # try again soon: the store may be busy for a moment
        now = time.time()
        for delivery in due:
            held = self._failing.get(delivery.webhook_id, (0, 0.0))[1]
            if held > now:
                upcoming = held if upcoming is None else min(upcoming, held)
                continue
            if delivery.id in self._attempts or delivery.id in self._unwritten or len(self._attempts) >= OVERALL \
                    or self._by_webhook[delivery.webhook_id] >= PER_WEBHOOK \
                    or self._by_tenant[delivery.tenant] >= PER_TENANT:
                continue  # an attempt's end wakes the next round
            self._by_webhook[delivery.webhook_id] += 1
            self._by_tenant[delivery.tenant] += 1
            self._attempts[delivery.id] = asyncio.create_task(self._attempt(client, delivery))
        return upcoming

    async def _write(self, read: bool = False) -> tuple[list[Due], float | None]:
        """Write the queued events and the ended attempts' outcomes (one transaction), then, if `read`, what
        is due now and when the next is: one job on the deliverer's thread."""
        events, outcomes = list(self._queued), self._outcomes
        self._queued.clear()
        self._outcomes = []
        now = time.time()

        def step() -> tuple[list[Due], float | None]:
            if events or outcomes:
                self.records.write(events, outcomes, now)
            if not read:
                return [], None
            return self.records.due(now, PER_WEBHOOK), self.records.next_due(now)

        try:
            return await self._in_thread(step)
        except BrowserVMError as exc:
            # Lost events are not sent; lost outcomes leave their deliveries pending, to be sent again.
            log.error("webhooks: %d events and %d outcomes not written: %s", len(events), len(outcomes), exc)
            raise
        finally:
            self._unwritten.difference_update(outcome.delivery_id for outcome in outcomes)

    def _backoff(self, failures: int) -> float:
        return float(min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s))

    async def _prune(self, now: float) -> None:
        # A webhook whose wait passed long ago (or that was deleted) starts its count again.
        self._failing = {webhook: (failures, held) for webhook, (failures, held) in self._failing.items()
                         if held > now - self.max_backoff_s}
        try:
            removed = await self._in_thread(self.records.prune, now)
        except BrowserVMError as exc:
            log.warning("webhooks: finished deliveries not pruned: %s", exc)
            return
        if removed:
            log.info("webhooks: %d finished deliveries forgotten", removed)

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, client: httpx.AsyncClient, delivery: Due) -> None:
        started = time.time()
        try:
            try:
                status, error = await self._post(client, delivery)
            except Exception as exc:  # a bug of ours: a failed attempt all the same, retried after its backoff
                log.exception("webhooks: delivery %d: the attempt failed unexpectedly", delivery.id)
                status, error = None, f"internal error: {type(exc).__name__}"
            now = time.time()
            if status is not None and 200 <= status < 300:
                outcome = Outcome(delivery.id, True, status, "", now)
                self._failing.pop(delivery.webhook_id, None)
            else:
                # The receiver is down or unwell for every delivery of its webhook, not this one only: they
                # all wait the same backoff, so a dead receiver costs one attempt per backoff, not one per event.
                failures, held = self._failing.get(delivery.webhook_id, (0, 0.0))
                if held <= started:  # not already held by an attempt made alongside this one
                    self._failing[delivery.webhook_id] = (failures + 1, now + self._backoff(failures + 1))
                attempt = delivery.attempts + 1
                retry_at = None if attempt >= self.max_attempts else now + self._backoff(attempt)
                outcome = Outcome(delivery.id, False, status, error, now, retry_at)
                if retry_at is None:
                    log.info("webhooks: delivery %d (%s to %s) given up after %d attempts: %s", delivery.id,
                             delivery.event, delivery.webhook_id, attempt, error)
                else:
                    log.debug("webhooks: delivery %d attempt %d failed: %s; again in %.1f s", delivery.id, attempt,
                              error, retry_at - now)
            self._outcomes.append(outcome)
            self._unwritten.add(delivery.id)
        finally:
            del self._attempts[delivery.id]
            self._by_webhook[delivery.webhook_id] -= 1
            self._by_tenant[delivery.tenant] -= 1
            self._wake.set()

    async def _post(self, client: httpx.AsyncClient, delivery: Due) -> tuple[int | None, str]:
        """The receiver's status (None if it did not answer) and, unless 2xx, what went wrong in words."""
        headers: dict[str, Any] = {"Content-Type": "application/json", "X-Browservm-Event": delivery.event,
                                   "X-Browservm-Delivery": str(delivery.id),
                                   SIGNATURE_HEADER: sign(delivery.secret, delivery.body)}
        try:
            # A whole deadline, not httpx's per read: a receiver that trickles its answer is cut off too.
            async with asyncio.timeout(self.timeout_s), \
                    client.stream("POST", delivery.url, content=delivery.body, headers=headers) as answer:
                status = answer.status_code  # the body is never read: a receiver cannot make us hold it
        except (TimeoutError, httpx.TimeoutException):
            return None, f"no answer within {self.timeout_s:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return None, (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)[:500]
        if 200 <= status < 300:
            return status, ""
        return status, f"answered HTTP {status}"
