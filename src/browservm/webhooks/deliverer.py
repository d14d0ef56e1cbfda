"""Sends each pending delivery to its receiver, signed, retrying with backoff, without holding anyone up.

A producer (a VM or login changing state) only calls `emit`: the event is queued in memory and the
deliverer woken. The deliverer, one task of the controller's, writes queued events as deliveries (one
transaction for however many are queued), then starts each delivery that is due, within bounds:

    PER_WEBHOOK  attempts under way to one webhook
    PER_TENANT   attempts under way for one tenant, over all its webhooks
    OVERALL      attempts under way at once

so receivers that hang (each attempt ends at `timeout_s`) hold at most PER_TENANT of the OVERALL slots:
another tenant's deliveries go on. It waits on an asyncio.Event, woken by an emit or an attempt's end,
with a deadline at the next retry due. Deliveries are rows in the store: a controller that stops (or
crashes) resumes its pending ones at its next start; one whose attempt was cut short is attempted again
(at least once, not exactly once: receivers dedupe by X-Browservm-Delivery or the event's id).

A non-2xx answer, a timeout or no connection is a failed attempt; the next is `backoff_s` * 2^(n-1)
later (at most `max_backoff_s`); after `max_attempts` the delivery is failed. Redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from typing import Any

import httpx

from browservm import __version__
from browservm.errors import BrowserVMError
from browservm.webhooks.events import Event
from browservm.webhooks.records import Due, WebhookStore
from browservm.webhooks.signing import SIGNATURE_HEADER, sign

log = logging.getLogger("browservm.webhooks")
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
        self._wake = asyncio.Event()
        self.started = False  # run() began (its end closes what it used)
        self._stopping = False
        self._stopped = asyncio.Event()
        self._attempts: dict[int, asyncio.Task[None]] = {}  # by delivery id: those under way
        self._by_webhook: Counter[str] = Counter()
        self._by_tenant: Counter[str] = Counter()

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
        """Stop delivering: attempts under way are cut short (they stay pending), queued events are written."""
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
        await self._write_queued()
        self._stopped.set()

    # --- one round ----------------------------------------------------------------------------

    async def _round(self, client: httpx.AsyncClient) -> float | None:
        """Write queued events, start what is due and fits the bounds; when the next retry is due."""
        await self._write_queued()
        now = time.time()
        try:
            due = await asyncio.to_thread(self.records.due, now, PER_WEBHOOK)
            upcoming = await asyncio.to_thread(self.records.next_due, now)
        except BrowserVMError as exc:
            log.error("webhooks: cannot read pending deliveries: %s", exc)
            return now + self.backoff_s  # try again soon: the store may be busy or full for a moment
        for delivery in due:
            if delivery.id in self._attempts or len(self._attempts) >= OVERALL \
                    or self._by_webhook[delivery.webhook_id] >= PER_WEBHOOK \
                    or self._by_tenant[delivery.tenant] >= PER_TENANT:
                continue  # an attempt's end wakes the next round
            self._by_webhook[delivery.webhook_id] += 1
            self._by_tenant[delivery.tenant] += 1
            self._attempts[delivery.id] = asyncio.create_task(self._attempt(client, delivery))
        return upcoming

    async def _write_queued(self) -> None:
        if not self._queued:
            return
        batch = list(self._queued)
        self._queued.clear()
        try:
            made = await asyncio.to_thread(self.records.record, batch, time.time())
        except BrowserVMError as exc:
            log.error("webhooks: %d events could not be written, not sent: %s", len(batch), exc)
            return
        if made:
            log.debug("webhooks: %d events, %d deliveries", len(batch), made)

    async def _prune(self, now: float) -> None:
        try:
            removed = await asyncio.to_thread(self.records.prune, now)
        except BrowserVMError as exc:
            log.warning("webhooks: finished deliveries not pruned: %s", exc)
            return
        if removed:
            log.info("webhooks: %d finished deliveries forgotten", removed)

    # --- one attempt --------------------------------------------------------------------------

    async def _attempt(self, client: httpx.AsyncClient, delivery: Due) -> None:
        try:
            status, error = await self._post(client, delivery)
            now = time.time()
            if status is not None and 200 <= status < 300:
                await asyncio.to_thread(self.records.delivered, delivery.id, status, now)
            else:
                attempt = delivery.attempts + 1
                retry_at = None if attempt >= self.max_attempts else \
                    now + min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)
                await asyncio.to_thread(self.records.attempt_failed, delivery.id, status, error, retry_at)
                log.info("webhooks: delivery %d (%s to %s) attempt %d failed: %s; %s", delivery.id, delivery.event,
                         delivery.webhook_id, attempt, error,
                         "given up" if retry_at is None else f"again in {retry_at - now:.1f} s")
        except Exception as exc:
            # The outcome is not recorded: the delivery stays pending and due, and is attempted again.
            log.error("webhooks: delivery %d: the outcome could not be written: %s", delivery.id, exc,
                      exc_info=not isinstance(exc, BrowserVMError))
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
