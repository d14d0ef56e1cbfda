"""How a delivery is signed, and how its receiver checks it.

    X-Browservm-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>

The timestamp is signed with the body, so a captured delivery cannot be replayed later than
`tolerance_s` with a new timestamp. The secret is the webhook's, shown once when it was created.
This module needs nothing but the standard library: a receiver may import it (`browservm.webhooks`)
or copy it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Browservm-Signature"
TOLERANCE_S = 300


class BadSignature(ValueError):
    """A delivery's signature does not hold: carries `reason`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"webhook signature refused: {reason}")


def _mac(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, now: float | None = None) -> str:
    """The X-Browservm-Signature header's value for `body`, sent at `now`."""
    t = int(time.time() if now is None else now)
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = TOLERANCE_S, now: float | None = None) -> int:
    """Check a delivery: `header` is its X-Browservm-Signature, `body` its bytes as received. Returns the signed
    timestamp; BadSignature if the header is malformed, no v1 signature matches, or the timestamp is more
    than `tolerance_s` away from `now` (a replay, or a clock that is off)."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise BadSignature(f"malformed header {header[:100]!r}: expected t=<seconds>,v1=<hex>")
        fields.setdefault(name, []).append(value)
    stamps = fields.get("t", [])
    if len(stamps) != 1 or not stamps[0].isdigit():
        raise BadSignature("the header has no single t=<unix seconds>")
    t = int(stamps[0])
    expected = _mac(secret, t, body)
    if not any(hmac.compare_digest(expected.encode(), given.encode()) for given in fields.get("v1", [])):
        raise BadSignature("no v1 signature matches the body (a wrong secret, or a body changed on the way)")
    age = (time.time() if now is None else now) - t
    if abs(age) > tolerance_s:
        raise BadSignature(f"signed {age:.0f} s ago, more than the {tolerance_s:.0f} s allowed (a replay, or a "
                           "clock that is off)")
    return t
