"""Webhooks and their deliveries in the state database (store.py: `webhooks`, `deliveries`).

Blocking (SQLite): the deliverer and the routes run these in a thread.

Bounds, so one tenant cannot grow the controller without end:
    MAX_WEBHOOKS        webhooks per tenant (the next is LimitExceeded, a 429)
    MAX_PENDING         deliveries waiting per tenant; past it the oldest waiting one is failed, and says so
    KEEP_FINISHED       delivered or failed deliveries kept per webhook, newest first; and none older than
    FINISHED_RETENTION_S
The secret is stored as it is, not hashed: each delivery is signed with it. The state database is the
controller's user's alone (0600 in a 0700 directory, store.py).
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass

from browservm.errors import BrowserVMError, LimitExceeded
from browservm.store import Store
from browservm.webhooks.events import Event

MAX_WEBHOOKS = 10
MAX_PENDING = 1000
KEEP_FINISHED = 1000
FINISHED_RETENTION_S = 7 * 86400.0
MAX_PAGE = 100
DROPPED = f"dropped: too many pending (the tenant's {MAX_PENDING} waiting deliveries are the most kept)"


class WebhookNotFound(BrowserVMError):
    """No webhook with this id, or not one the caller may see (as one that never was)."""

    def __init__(self, webhook_id: str) -> None:
        self.webhook_id = webhook_id
        super().__init__(f"no webhook {webhook_id[:64]}")


@dataclass(frozen=True)
class Webhook:
    webhook_id: str
    tenant: str
    url: str
    events: tuple[str, ...]
    created_at: float
    disabled: bool


@dataclass(frozen=True)
class Delivery:
    id: int
    webhook_id: str
    tenant: str
    event: str
    event_id: str
    body: str
    attempts: int
    state: str  # pending, delivered or failed
    next_attempt_at: float | None  # while pending
    last_status: int | None  # the receiver's last HTTP status, if it answered
    last_error: str
    created_at: float
    delivered_at: float | None


@dataclass(frozen=True)
class Due:
    """One delivery to attempt now, with where and how to sign it."""

    id: int
    webhook_id: str
    tenant: str
    event: str
    body: bytes
    attempts: int
    url: str
    secret: str


@dataclass(frozen=True)
class Outcome:
    """How an attempt went: delivered, or failed and retried at `retry_at` (None: given up)."""

    delivery_id: int
    delivered: bool
    status: int | None  # the receiver's HTTP status, if it answered
    error: str
    at: float
    retry_at: float | None = None


def _record(db: sqlite3.Connection, events: list[tuple[Event, str]], now: float) -> int:
    """Each (event, its body) as deliveries; the bodies are made before the transaction, to keep it short: the
    manager's writes wait for it."""
    made = 0
    hooks: dict[str, list[tuple[str, set[str]]]] = {}
    for event, body in events:
        if event.tenant not in hooks:
            hooks[event.tenant] = [(str(i), set(json.loads(e))) for i, e in db.execute(
                "SELECT id, events FROM webhooks WHERE tenant = ?", (event.tenant,))]
        targets = [webhook_id for webhook_id, wanted in hooks[event.tenant] if event.type in wanted]
        if not targets:
            continue
        db.executemany("INSERT INTO deliveries (webhook_id, tenant, event, event_id, body, next_attempt_at, state, "
                       "created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                       [(webhook_id, event.tenant, event.type, event.id, body, now, now) for webhook_id in targets])
        made += len(targets)
    for tenant in hooks:
        db.execute("UPDATE deliveries SET state = 'failed', last_error = ?1 WHERE id IN (SELECT id FROM deliveries "
                   "WHERE tenant = ?2 AND state = 'pending' ORDER BY id DESC LIMIT -1 OFFSET ?3)",
                   (DROPPED, tenant, MAX_PENDING))
    return made


_WEBHOOK = "SELECT id, tenant, url, events, created_at, disabled FROM webhooks"
_DELIVERY = ("SELECT id, webhook_id, tenant, event, event_id, body, attempts, state, next_attempt_at, last_status, "
             "last_error, created_at, delivered_at FROM deliveries")


def _webhook(row: tuple[object, ...]) -> Webhook:
    webhook_id, tenant, url, events, created_at, disabled = row
    return Webhook(str(webhook_id), str(tenant), str(url), tuple(json.loads(str(events))), float(str(created_at)),
                   bool(disabled))


def _delivery(row: tuple[object, ...]) -> Delivery:
    (id_, webhook_id, tenant, event, event_id, body, attempts, state, next_at, status, error, created_at,
     delivered_at) = row
    return Delivery(int(str(id_)), str(webhook_id), str(tenant), str(event), str(event_id), str(body),
                    int(str(attempts)), str(state), float(str(next_at)) if state == "pending" else None,
                    None if status is None else int(str(status)), str(error), float(str(created_at)),
                    None if delivered_at is None else float(str(delivered_at)))


class WebhookStore:
    def __init__(self, store: Store) -> None:
        self._store = store

    # --- webhooks ------------------------------------------------------------------------

    def create(self, tenant: str, url: str, events: Iterable[str],
               webhook_id: str | None = None) -> tuple[Webhook, str]:
        """A new webhook and its secret (the only time the secret is returned). `url` and `events` are
        checked by the caller (events.py)."""
        webhook = Webhook(webhook_id or "wh-" + secrets.token_hex(6), tenant, url, tuple(events), time.time(), False)
        secret = "whsec_" + secrets.token_urlsafe(32)
        with self._store.transaction() as db:
            count = db.execute("SELECT count(*) FROM webhooks WHERE tenant = ?", (tenant,)).fetchone()[0]
            if count >= MAX_WEBHOOKS:
                raise LimitExceeded("max_webhooks_per_tenant", MAX_WEBHOOKS,
                                    f"tenant {tenant or '(the operator)'!r} has {count} webhooks already")
            db.execute("INSERT INTO webhooks (id, tenant, url, events, secret, created_at, disabled) "
                       "VALUES (?, ?, ?, ?, ?, ?, 0)", (webhook.webhook_id, tenant, url,
                                                        json.dumps(list(webhook.events)), secret, webhook.created_at))
        return webhook, secret

    def get(self, webhook_id: str) -> Webhook:
        rows = self._store.read(f"{_WEBHOOK} WHERE id = ?", (webhook_id,))
        if not rows:
            raise WebhookNotFound(webhook_id)
        return _webhook(rows[0])

    def all(self, tenant: str | None = None) -> list[Webhook]:
        """Every webhook (of `tenant`), oldest first."""
        return [_webhook(row) for row in self._store.read(
            f"{_WEBHOOK} WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at, id", (tenant,))]

    def delete(self, webhook_id: str) -> Webhook:
        """Remove the webhook and its deliveries, waiting ones included."""
        with self._store.transaction() as db:
            rows = db.execute(f"{_WEBHOOK} WHERE id = ?", (webhook_id,)).fetchall()
            if not rows:
                raise WebhookNotFound(webhook_id)
            db.execute("DELETE FROM deliveries WHERE webhook_id = ?", (webhook_id,))
            db.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,))
        return _webhook(rows[0])

    def set_disabled(self, webhook_id: str, disabled: bool) -> Webhook:
        with self._store.transaction() as db:
            if not db.execute("UPDATE webhooks SET disabled = ? WHERE id = ?", (disabled, webhook_id)).rowcount:
                raise WebhookNotFound(webhook_id)
            return _webhook(db.execute(f"{_WEBHOOK} WHERE id = ?", (webhook_id,)).fetchone())

    # --- deliveries ----------------------------------------------------------------------

    def record(self, events: Iterable[Event], now: float) -> int:
        """A pending delivery of each event to each of its tenant's webhooks that asked for its type, due now.
        A tenant over MAX_PENDING loses its oldest waiting ones (failed, saying why). How many were made."""
        bodies = [(event, event.body().decode()) for event in events]
        with self._store.transaction() as db:
            return _record(db, bodies, now)

    def write(self, events: Iterable[Event], outcomes: Iterable[Outcome], now: float) -> int:
        """`record` and the attempts' outcomes, in one transaction: under a flood, one commit per round."""
        bodies = [(event, event.body().decode()) for event in events]
        with self._store.transaction() as db:
            made = _record(db, bodies, now)
            for outcome in outcomes:
                if outcome.delivered:
                    db.execute("UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, last_status = ?, "
                               "last_error = '', delivered_at = ? WHERE id = ? AND state = 'pending'",
                               (outcome.status, outcome.at, outcome.delivery_id))
                elif outcome.retry_at is None:  # given up
                    db.execute("UPDATE deliveries SET state = 'failed', attempts = attempts + 1, last_status = ?, "
                               "last_error = ? WHERE id = ? AND state = 'pending'",
                               (outcome.status, outcome.error, outcome.delivery_id))
                else:
                    db.execute("UPDATE deliveries SET attempts = attempts + 1, last_status = ?, last_error = ?, "
                               "next_attempt_at = ? WHERE id = ? AND state = 'pending'",
                               (outcome.status, outcome.error, outcome.retry_at, outcome.delivery_id))
        return made

    def due(self, now: float, per_webhook: int) -> list[Due]:
        """Pending deliveries due by `now` to enabled webhooks, at most `per_webhook` per webhook (the
        earliest due), earliest first."""
        rows = self._store.read(
            "SELECT d.id, d.webhook_id, d.tenant, d.event, d.body, d.attempts, w.url, w.secret FROM ("
            "  SELECT id, webhook_id, tenant, event, body, attempts, next_attempt_at, row_number() OVER ("
            "    PARTITION BY webhook_id ORDER BY next_attempt_at, id) AS n "
            "  FROM deliveries WHERE state = 'pending' AND next_attempt_at <= ?1) d "
            "JOIN webhooks w ON w.id = d.webhook_id AND NOT w.disabled "
            "WHERE d.n <= ?2 ORDER BY d.next_attempt_at, d.id", (now, per_webhook))
        return [Due(int(str(i)), str(w), str(t), str(e), str(b).encode(), int(str(a)), str(u), str(s))
                for i, w, t, e, b, a, u, s in rows]

    def next_due(self, now: float) -> float | None:
        """When the next pending delivery (to an enabled webhook) falls due after `now`; None: none waits."""
        row = self._store.read("SELECT min(d.next_attempt_at) FROM deliveries d JOIN webhooks w "
                               "ON w.id = d.webhook_id AND NOT w.disabled "
                               "WHERE d.state = 'pending' AND d.next_attempt_at > ?", (now,))[0]
        return None if row[0] is None else float(str(row[0]))

    def deliveries(self, webhook_id: str, after: int | None = None, limit: int = MAX_PAGE) -> list[Delivery]:
        """The webhook's deliveries, newest first; `after` is the last id of the previous page."""
        rows = self._store.read(f"{_DELIVERY} WHERE webhook_id = ?1 AND (?2 IS NULL OR id < ?2) "
                                "ORDER BY id DESC LIMIT ?3", (webhook_id, after, min(limit, MAX_PAGE)))
        return [_delivery(row) for row in rows]

    def prune(self, now: float) -> int:
        """Forget finished deliveries past KEEP_FINISHED per webhook or FINISHED_RETENTION_S. How many."""
        with self._store.transaction() as db:
            return int(db.execute(
                "DELETE FROM deliveries WHERE id IN (SELECT id FROM (SELECT id, created_at, row_number() OVER ("
                "  PARTITION BY webhook_id ORDER BY id DESC) AS n FROM deliveries WHERE state != 'pending') "
                "WHERE n > ?1 OR created_at < ?2)", (KEEP_FINISHED, now - FINISHED_RETENTION_S)).rowcount)
