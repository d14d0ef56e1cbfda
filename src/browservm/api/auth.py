"""Who may call the operator's routes: the API key, or the session cookie the sign-in form sets.

Shared by every part that mounts routes (app.py, logins.py, diagnose.py), so there is one rule.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

SESSION_COOKIE = "browservm_session"

# Declares the key in the OpenAPI document (its "Authorize" button in /docs); it refuses nothing itself
# (auto_error=False): `operator` below is the one check, bearer or cookie.
BEARER = HTTPBearer(scheme_name="operatorKey", auto_error=False,
                    description="The API key (the state directory's api.key): `Authorization: Bearer KEY`.")


class ApiError(Exception):
    """An HTTP error with browservm's body, `{"error": {"type", "message", ...}}` (app.py answers it)."""

    def __init__(self, status: int, kind: str, message: str, **fields: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"type": kind, "message": message, **{k: v for k, v in fields.items() if v is not None}}


def session_value(api_key: str) -> str:
    """The operator session cookie: derived from the API key, so a new key ends old sessions."""
    return hmac.new(api_key.encode(), b"browservm operator session", hashlib.sha256).hexdigest()


def require_operator(api_key: str) -> Callable[[Request], None]:
    """A FastAPI dependency: the bearer key, or the session cookie (plus X-Browservm: 1 for a change)."""
    session = session_value(api_key)

    def operator(request: Request,
                 declared: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)] = None) -> None:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), api_key.encode()):
            return
        cookie = request.cookies.get(SESSION_COOKIE, "")
        if cookie and hmac.compare_digest(cookie.encode(), session.encode()):
            # A cookie goes with any request the browser makes, even one a foreign page causes:
            # changes also need a header such a page cannot set.
            if request.method in ("GET", "HEAD") or request.headers.get("x-browservm") == "1":
                return
            raise ApiError(403, "Forbidden", "a change signed in by cookie needs the X-Browservm: 1 header")
        raise ApiError(401, "Unauthorized", "missing or wrong API key: send `Authorization: Bearer <key>` "
                                            "(the key is in the state directory's api.key)")
    return operator
