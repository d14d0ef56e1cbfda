"""What the access commands (`key`, `tenant`, `audit`: keys.py, tenants.py, audit.py) share: their two
modes, one JSON view, and how they tell times and refuse flags.

Without `--url` they work on the state directory's store in this process (access/: KeyRing, Quotas,
AuditTrail), as `vm` commands do locally; the store is SQLite shared with a running controller, so a
key revoked here is refused at its next request there. With `--url URL` (or BROWSERVM_URL) they ask
that controller through browservm.client, with the CLI's key (an admin key for `key` and `tenant
quota`). Both modes give the API's JSON (its KeyOut, TenantOut and AuditPage shapes), so `--json`
and the human lines are the same either way.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from browservm.access.audit import AuditEntry, AuditTrail
from browservm.access.keys import KeyNotFound, KeyRefused, KeyRing
from browservm.access.principal import Role
from browservm.access.quotas import Quota, Quotas
from browservm.cli.client import CA_FILE_HELP, connect, parse_url
from browservm.client import Client
from browservm.client.models import Quota as QuotaIn
from browservm.config import Settings
from browservm.errors import BrowserVMError, InvalidInput, StateError
from browservm.store import Store

QUOTA_FIELDS = ("max_vms", "max_mem_mib", "logins_per_hour")
LOCAL_KEY_ID = "local"  # the audit trail's key id for a change made here, on the store (no key is given)
_AGO = re.compile(r"(\d+)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AccessRefused(BrowserVMError):
    """No such key, or a change to a key that would do harm (the operator's own): the store's words."""


class Backend(Protocol):
    def create_key(self, name: str, role: str, tenant: str | None) -> dict[str, Any]: ...
    def list_keys(self, tenant: str | None) -> list[dict[str, Any]]: ...
    def revoke_key(self, key_id: str) -> dict[str, Any]: ...
    def tenant(self, tenant: str) -> dict[str, Any]: ...
    def set_quota(self, tenant: str, quota: Quota) -> None: ...
    def set_clipboard(self, tenant: str, clipboard: str) -> None: ...
    def audit(self, since: float, tenant: str | None, vm_id: str | None, after: int,
              limit: int) -> dict[str, Any]: ...


def add_remote_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", metavar="URL",
                        help="ask the controller at URL instead of its state directory's store (also BROWSERVM_URL; "
                             "the API key is <state-dir>/api.key or BROWSERVM_API_KEY)")
    parser.add_argument("--ca-file", type=Path, metavar="PEM", help=CA_FILE_HELP)


@contextmanager
def backend(args: argparse.Namespace, settings: Settings) -> Iterator[Backend]:
    url = args.url if args.url is not None else os.environ.get("BROWSERVM_URL", "")
    if url:
        parse_url(url)
        with connect(url, settings) as client:
            yield Remote(client)
        return
    database = settings.database
    if not database.exists():  # nothing to read, and keys made here would wait for a controller that may never come
        raise StateError(str(database), "no controller's store here: give its state directory with --state-dir, or "
                                        "the controller with --url")
    with Store(database) as store:
        yield Local(store, settings)


class Local:
    """The state directory's store, in this process. Its changes go to the audit trail as the API's do,
    by LOCAL_KEY_ID: whoever could write the store on this host (root, as a rule), with no key of theirs."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self._keys = KeyRing(store)
        self._quotas = Quotas(store)
        self._audit = AuditTrail(store, settings.audit_retention)

    def _audited(self, action: str, tenant: str, target: str) -> None:
        asyncio.run(self._audit.record(AuditEntry(LOCAL_KEY_ID, tenant, action, target, "done", "the CLI, on the "
                                                  "state directory's store")))

    def create_key(self, name: str, role: str, tenant: str | None) -> dict[str, Any]:
        made, secret = self._keys.create(name, role, tenant)
        self._audited("key create", made.tenant, made.key_id)
        return {**_key_view(made), "key": secret}

    def list_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        return [_key_view(key) for key in self._keys.all(tenant)]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        try:
            revoked = self._keys.revoke(key_id)
        except (KeyNotFound, KeyRefused) as exc:
            raise AccessRefused(str(exc)) from None
        self._audited("key revoke", revoked.tenant, revoked.key_id)
        return _key_view(revoked)

    def tenant(self, tenant: str) -> dict[str, Any]:
        return {"tenant": tenant, "quota": dataclasses.asdict(self._quotas.get(tenant)),
                "clipboard": self._quotas.clipboard(tenant), "usage": self._quotas.usage(tenant, time.time() - 3600)}

    def set_quota(self, tenant: str, quota: Quota) -> None:
        self._quotas.set(tenant, quota)
        self._audited("tenant quota", tenant, tenant)

    def set_clipboard(self, tenant: str, clipboard: str) -> None:
        self._quotas.set_clipboard(tenant, clipboard)
        self._audited("tenant clipboard", tenant, tenant)

    def audit(self, since: float, tenant: str | None, vm_id: str | None, after: int, limit: int) -> dict[str, Any]:
        rows = self._audit.query(since=since, tenant=tenant, target=vm_id, after_id=after, limit=limit)
        return {"entries": [dataclasses.asdict(row) for row in rows],
                "next": rows[-1].id if len(rows) == limit else None}


class Remote:
    """A controller, through browservm.client."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create_key(self, name: str, role: str, tenant: str | None) -> dict[str, Any]:
        return self._client.create_key(name, role, tenant).as_json()

    def list_keys(self, tenant: str | None) -> list[dict[str, Any]]:
        return [key.as_json() for key in self._client.list_keys(tenant)]

    def revoke_key(self, key_id: str) -> dict[str, Any]:
        return self._client.revoke_key(key_id).as_json()

    def tenant(self, tenant: str) -> dict[str, Any]:
        return self._client.tenant(tenant).as_json()

    def set_quota(self, tenant: str, quota: Quota) -> None:
        self._client.set_quota(tenant, QuotaIn(**dataclasses.asdict(quota)))

    def set_clipboard(self, tenant: str, clipboard: str) -> None:
        self._client.set_clipboard(tenant, clipboard)

    def audit(self, since: float, tenant: str | None, vm_id: str | None, after: int, limit: int) -> dict[str, Any]:
        return self._client.audit(since=since, tenant=tenant, vm_id=vm_id, after=after, limit=limit).as_json()


def _key_view(key: Any) -> dict[str, Any]:
    view = dataclasses.asdict(key)
    view["role"] = Role(view["role"]).value
    return view


@contextmanager
def as_flags() -> Iterator[None]:
    """A bad value is named by the flag that gave it (`--tenant: ...`), as a person typed it; a positional
    argument keeps the name its usage gives it (TENANT)."""
    try:
        yield
    except InvalidInput as exc:
        if exc.field.startswith("--") or exc.field.isupper():
            raise
        raise InvalidInput(f"--{exc.field.replace('_', '-')}", exc.value, exc.reason) from None


def when(seconds: float | None) -> str:
    """A time as RFC 3339 in UTC, to the second; '-' for none."""
    if seconds is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def parse_since(value: str, now: float | None = None) -> float:
    """Unix seconds from a time ago (`30m`, `2h`, `7d`), a date or time (RFC 3339; UTC unless it has an
    offset) or unix seconds."""
    now = time.time() if now is None else now
    if (ago := _AGO.fullmatch(value.strip())) is not None:
        return max(0.0, now - int(ago.group(1)) * _UNIT_S[ago.group(2)])
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    try:
        moment = datetime.datetime.fromisoformat(value.strip())
    except ValueError:
        raise InvalidInput("--since", value, "must be a time ago (30m, 2h, 7d), a date or time (2026-12-07, "
                                             "2026-12-07T09:00Z; UTC unless it has an offset) or unix "
                                             "seconds") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return max(0.0, moment.timestamp())
