"""What a webhook can be told, what it is told, and where it may be told it.

An event's body is JSON: {id, type, at (RFC 3339, UTC), tenant, data}, where data is the VM or the
login as the API shows it (GET /v1/vms/{id}, GET /v1/logins/{id}). A body over MAX_BODY carries
only the record's id, state, user and tenant, and `"truncated": true`.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from browservm.errors import InvalidInput

VM_EVENTS = {"ready": "vm.ready", "failed": "vm.failed", "ended": "vm.ended", "destroyed": "vm.destroyed"}
LOGIN_EVENTS = {"captured": "login.captured", "failed": "login.failed", "timed-out": "login.ended",
                "cancelled": "login.ended"}
EVENT_TYPES = tuple(sorted({*VM_EVENTS.values(), *LOGIN_EVENTS.values()}))
MAX_BODY = 64 * 1024
MAX_URL = 2048
_KEPT_WHEN_TRUNCATED = ("vm_id", "login_id", "state", "user", "tenant")


@dataclass(frozen=True)
class Event:
    type: str
    tenant: str
    data: dict[str, Any]
    id: str = field(default_factory=lambda: "evt-" + secrets.token_hex(8))
    at: float = field(default_factory=time.time)

    def body(self) -> bytes:
        """The JSON every webhook of the tenant for this type receives, at most MAX_BODY bytes."""
        stamp = datetime.fromtimestamp(self.at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        whole = {"id": self.id, "type": self.type, "at": stamp, "tenant": self.tenant, "data": self.data}
        body = json.dumps(whole, separators=(",", ":")).encode()
        if len(body) <= MAX_BODY:
            return body
        whole["data"] = {name: self.data[name] for name in _KEPT_WHEN_TRUNCATED if name in self.data} \
            | {"truncated": True}
        return json.dumps(whole, separators=(",", ":")).encode()


def validate_url(value: str) -> str:
    """An http(s) URL with a host, at most MAX_URL characters. Any host: receivers on loopback and private
    networks are the operator's to allow (see README, Webhooks)."""
    if len(value) > MAX_URL:
        raise InvalidInput("url", value[:80] + "...", f"must be at most {MAX_URL} characters, has {len(value)}")
    if any(ord(char) < 0x21 or ord(char) == 0x7f for char in value):
        raise InvalidInput("url", value, "must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port  # parsed here: a port that is not a number raises
    except ValueError as exc:
        raise InvalidInput("url", value, f"is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidInput("url", value, "must be http:// or https://")
    if not parts.hostname:
        raise InvalidInput("url", value, "must name a host")
    if port == 0:
        raise InvalidInput("url", value, "port 0 is no port")
    return value


def validate_events(values: Sequence[str]) -> list[str]:
    """The event types, each known, none twice, at least one; sorted."""
    if not values:
        raise InvalidInput("events", values, f"must name at least one of {', '.join(EVENT_TYPES)}")
    for value in values:
        if value not in EVENT_TYPES:
            raise InvalidInput("events", value, f"is not an event type: one of {', '.join(EVENT_TYPES)}")
    return sorted(set(values))
