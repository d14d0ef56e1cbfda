"""The audit trail's HTTP side (access/audit.py keeps it): an ASGI middleware that records each
state-changing request, and each credentials read, once its answer is known.

It records after the app ran, from what the route and its key dependency left in the request's
state: the principal (api/auth.py), and what a route names as the target and its tenant when the
path does not say (a new VM's id). A request refused before its key was known (401) is not
recorded: the access log has it, and recording it would let anyone fill the trail.
"""

from __future__ import annotations

import contextlib
import re

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from browservm.access.audit import AuditEntry, AuditTrail
from browservm.access.principal import Principal
from browservm.errors import BrowserVMError

_CHANGES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_SECRET_READS = re.compile(r"^/v1/users/[^/]+/credentials/[^/]+$")
_TARGETS = ("vm_id", "login_id", "key_id", "tenant", "webhook_id")


def audited(request: Request, target: str, tenant: str) -> None:
    """Name what a request acted on, when its path does not (a create's new id), and whose it is."""
    request.state.audit_target = target
    request.state.audit_tenant = tenant


def _is_audited(scope: Scope) -> bool:
    method, path = scope.get("method", ""), scope.get("path", "")
    if method in _CHANGES:
        return path.startswith("/v1/") or path in ("/login", "/logout")
    return method == "GET" and bool(_SECRET_READS.match(path))


def _target(params: dict[str, str]) -> str:
    if "user" in params and "provider" in params:
        return f"{params['user']}/{params['provider']}"
    return next((params[name] for name in _TARGETS if name in params), "")


class Audited:
    def __init__(self, app: ASGIApp, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_audited(scope):
            await self.app(scope, receive, send)
            return
        status = 500  # what the trail says when the app raised before answering

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            state = scope.get("state", {})
            principal = state.get("principal")
            if isinstance(principal, Principal):
                route = scope.get("route")
                template = getattr(route, "path", scope.get("path", ""))
                entry = AuditEntry(principal.key_id, state.get("audit_tenant", principal.tenant),
                                   f"{scope['method']} {template}",
                                   state.get("audit_target") or _target(scope.get("path_params", {})), str(status))
                with contextlib.suppress(BrowserVMError):  # logged by the trail; the answer is already sent
                    await self.trail.record(entry)
