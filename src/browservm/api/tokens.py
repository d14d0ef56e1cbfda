"""Viewer tokens: short-lived, signed, bound to one VM, revoked with it; renewed by an open viewer.

    v1.<vm id>.<expires, unix seconds>.<HMAC-SHA256 of (vm id, the VM's viewer epoch, expires)>

The viewer epoch is a random value in the VM's record. It is in the signature but not in the
token, so a token works only while that record exists: deleting the VM revokes every token of
it, and a VM that later gets the same id has a new epoch and does not accept an old token.

A link lasts as long as the session it opens: the viewer page trades its token, while it is still
valid, for a new one (`POST /view/{id}/token`) before it expires, and puts it in its own address, so
a reload works. A link nobody opens still expires after `ttl`, and no token outlives its VM's end.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

_VERSION = "v1"
MAX_TOKEN_LENGTH = 256


class TokenRefused(Exception):
    """The token cannot open this VM's desktop; `reason` says why, in words a viewer page can show."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ViewerTokens:
    def __init__(self, key: bytes, ttl: float = 600.0, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self.ttl = ttl
        self._clock = clock

    def _signature(self, vm_id: str, epoch: str, expires: int) -> str:
        mac = hmac.new(self._key, f"{vm_id}\0{epoch}\0{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def issue(self, vm_id: str, epoch: str, until: float | None = None) -> tuple[str, int]:
        """A token valid for `ttl`, or until `until` if that is sooner (the VM's own end)."""
        expires = int(self._clock() + self.ttl)
        if until is not None:
            expires = min(expires, int(until))
        return f"{_VERSION}.{vm_id}.{expires}.{self._signature(vm_id, epoch, expires)}", expires

    def check(self, token: str, vm_id: str, epoch: str) -> None:
        """Return if `token` opens `vm_id` now; TokenRefused otherwise."""
        if not token or len(token) > MAX_TOKEN_LENGTH:
            raise TokenRefused("no viewer token, or not one of ours")
        parts = token.split(".")
        # ASCII digits only: str.isdigit also takes superscripts and circled numbers, which int() refuses.
        if len(parts) != 4 or parts[0] != _VERSION or not (parts[2].isascii() and parts[2].isdigit()):
            raise TokenRefused("the viewer token is malformed")
        token_vm, expires = parts[1], int(parts[2])
        if token_vm != vm_id:
            raise TokenRefused(f"the viewer token is for another VM ({token_vm[:63]})")
        # Bytes, not str: compare_digest refuses a str with anything but ASCII in it (TypeError), and a
        # signature of "é" was an unauthenticated 500 (issue 18). Even a lone surrogate encodes here.
        given = parts[3].encode(errors="surrogatepass")
        if not hmac.compare_digest(given, self._signature(vm_id, epoch, expires).encode()):
            raise TokenRefused("the viewer token is not valid for this VM (revoked, or not signed by this controller)")
        if expires < self._clock():
            raise TokenRefused("the viewer token has expired; ask for a new viewer link")
