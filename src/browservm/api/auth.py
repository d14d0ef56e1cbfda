"""Who is calling: an API key (`Authorization: Bearer KEY`), or the session cookie the sign-in form sets.

Shared by every part that mounts routes (app.py, logins.py, diagnose.py, access_routes.py, a cluster's
front), so there is one rule. Each route's dependency yields the caller's Principal (access/principal.py):
its key id, role and tenant; routes scope what they show and touch by it.

A session cookie is `<key id>.<expiry>.<HMAC>`: it names the key it was signed in with, so it ends
when that key is revoked (looked up at each request), at its expiry, or at sign-out.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from browservm.access.principal import Principal, Role

SESSION_COOKIE = "browservm_session"
SESSION_TTL_S = 12 * 3600

# Declares the key in the OpenAPI document (its "Authorize" button in /docs); it refuses nothing itself
# (auto_error=False): `Access.principal` is the one check, bearer or cookie.
BEARER = HTTPBearer(scheme_name="apiKey", auto_error=False,
                    description="An API key: `Authorization: Bearer KEY` (the state directory's api.key is the "
                                "first admin key; `browservm key create` makes more).")


class ApiError(Exception):
    """An HTTP error with browservm's body, `{"error": {"type", "message", ...}}` (app.py answers it)."""

    def __init__(self, status: int, kind: str, message: str, **fields: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"type": kind, "message": message, **{k: v for k, v in fields.items() if v is not None}}


class Keys(Protocol):
    """Where keys are looked up (blocking: a dependency runs in a worker thread)."""

    def authenticate(self, key: str) -> Principal | None: ...

    def live(self, key_id: str) -> Principal | None: ...


class OneKey:
    """A single admin key (a cluster's front, a host's controller): no key ring behind it."""

    def __init__(self, key: str, key_id: str = "operator") -> None:
        self._key = key
        self._principal = Principal(key_id, key_id, Role.ADMIN, "")

    def authenticate(self, key: str) -> Principal | None:
        return self._principal if hmac.compare_digest(key.encode(), self._key.encode()) else None

    def live(self, key_id: str) -> Principal | None:
        return self._principal if key_id == self._principal.key_id else None


def session_key(api_key: str) -> bytes:
    """What signs sessions: derived from the operator's key, so a new api.key ends every session."""
    return hashlib.sha256(b"browservm sessions\n" + api_key.encode()).digest()


class Access:
    def __init__(self, keys: Keys, session_key: bytes, session_ttl: float = SESSION_TTL_S) -> None:
        self.keys = keys
        self._session_key = session_key
        self.session_ttl = session_ttl

    def session(self, principal: Principal, now: float | None = None) -> str:
        """A session cookie's value for `principal`, valid for `session_ttl`."""
        expires = int((time.time() if now is None else now) + self.session_ttl)
        signed = f"{principal.key_id}.{expires}"
        return f"{signed}.{self._mac(signed)}"

    def _mac(self, signed: str) -> str:
        return hmac.new(self._session_key, f"browservm session {signed}".encode(), hashlib.sha256).hexdigest()

    def _from_session(self, cookie: str) -> Principal | None:
        key_id, _, rest = cookie.partition(".")
        expires, _, mac = rest.partition(".")
        if not expires.isdigit() or int(expires) < time.time() or len(cookie) > 256:
            return None
        if not hmac.compare_digest(mac.encode(), self._mac(f"{key_id}.{expires}").encode()):
            return None
        return self.keys.live(key_id)

    def principal(self, request: Request) -> Principal:
        """The caller, or ApiError 401/403. Noted in the request's state for the audit trail."""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        found = self.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if found is None:
            cookie = request.cookies.get(SESSION_COOKIE, "")
            found = self._from_session(cookie) if cookie else None
            # A cookie goes with any request the browser makes, even one a foreign page causes:
            # changes also need a header such a page cannot set.
            if found is not None and request.method not in ("GET", "HEAD") \
                    and request.headers.get("x-browservm") != "1":
                raise ApiError(403, "Forbidden", "a change signed in by cookie needs the X-Browservm: 1 header")
        if found is None:
            raise ApiError(401, "Unauthorized", "missing, wrong or revoked API key: send `Authorization: Bearer "
                                                "<key>` (the state directory's api.key is an admin key)")
        request.state.principal = found
        return found


def caller(request: Request,
            declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None) -> Principal:
    # Sync: FastAPI runs it in a worker thread, where the key ring's SQLite read may block.
    access: Access = request.app.state.access
    return access.principal(request)


def admin_only(principal: Annotated[Principal, Depends(caller)]) -> Principal:
    principal.only_admin("use an admin route")
    return principal


# What a route takes to know its caller (the app's `state.access` decides): any valid key, or admin keys only
# (403 for a tenant key). FastAPI runs each once per request, however many parts of a route ask for it.
Caller = Annotated[Principal, Depends(caller)]
Admin = Annotated[Principal, Depends(admin_only)]
