"""The controller's routes, described once: method, path, query, body and how to read the answer.

The sync and the async client send these descriptions (`Call`) and read the answers the same way
(http.py); neither knows a route of its own. Ids are checked and quoted here: an id must not become
another path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from browservm.client.models import (
    ApiKey,
    AuditPage,
    CancelledLogin,
    Credentials,
    Host,
    Login,
    NewKey,
    Profile,
    Provider,
    Quota,
    StartedLogin,
    Tenant,
    Viewer,
    Vm,
)
from browservm.errors import InvalidInput
from browservm.ids import validate_vm_id

_KEY_ID = re.compile(r"[a-z0-9]{1,32}")
# The server's access.principal.TENANT_PATTERN, written again: the client imports nothing of the server.
TENANT = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")

T = TypeVar("T")
PAGE = 500  # a listing's page: the most the server gives at once


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    read: Callable[[Any], T]  # the answer's JSON -> the result (raises ValueError, TypeError or KeyError)
    params: Mapping[str, str | int | bool | list[str]] | None = None
    body: Mapping[str, Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    # Answered only when the controller is done (a create with ?wait=true): bounded by its own deadlines.
    waits: bool = False
    paged: bool = False  # a listing a page at a time: the clients follow X-Next-Cursor to its end


def _vm(vm_id: str, *rest: str) -> str:
    return "/".join(("/v1/vms", quote(validate_vm_id(vm_id), safe=""), *rest))


def _login(login_id: str, *rest: str) -> str:
    return "/".join(("/v1/logins", quote(_given("login_id", login_id), safe=""), *rest))


def _credentials(user: str, provider: str) -> str:
    user, provider = (quote(_given(name, value), safe="") for name, value in (("user", user), ("provider", provider)))
    return f"/v1/users/{user}/credentials/{provider}"


def _given(name: str, value: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidInput(name, value, "must be a non-empty string")
    return value


def _idempotent(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Idempotency-Key": _given("idempotency_key", key)}


def _list(model: Callable[[Any], T]) -> Callable[[Any], list[T]]:
    def read(payload: Any) -> list[T]:
        if not isinstance(payload, list):
            raise TypeError(f"expected a list, got {type(payload).__name__}")
        return [model(item) for item in payload]
    return read


def _json(payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict):
        raise TypeError(f"expected an object, got {type(payload).__name__}")
    return payload


# --- VMs ---------------------------------------------------------------------------------------------

def create_vm(user: str, vcpus: int | None, mem_mib: int | None, wait: bool, idempotency_key: str | None, *,
              labels: Mapping[str, str] | None = None, timeout_s: int | None = None,
              template: str | None = None, profile: str | None = None) -> Call[Vm]:
    body: dict[str, Any] = {"user": user}
    for name, value in (("vcpus", vcpus), ("mem_mib", mem_mib), ("timeout_s", timeout_s), ("template", template),
                        ("profile", profile)):
        if value is not None:
            body[name] = value
    if labels:
        body["labels"] = dict(labels)
    return Call("POST", "/v1/vms", Vm.model_validate, params={"wait": "true"} if wait else None, body=body,
                headers=_idempotent(idempotency_key), waits=wait)


def list_vms(user: str | None = None, state: str | None = None, labels: Mapping[str, str] | None = None,
             tenant: str | None = None, template: str | None = None) -> Call[list[Vm]]:
    params: dict[str, str | int | bool | list[str]] = {"limit": PAGE}
    for name, value in (("user", user), ("state", state), ("tenant", tenant), ("template", template)):
        if value is not None:
            params[name] = value
    if labels:
        params["label"] = [f"{key}={value}" for key, value in labels.items()]
    return Call("GET", "/v1/vms", _list(Vm.model_validate), params=params, paged=True)


def extend_vm(vm_id: str, timeout_s: int, idempotency_key: str | None = None) -> Call[Vm]:
    return Call("POST", _vm(vm_id, "extend"), Vm.model_validate, body={"timeout_s": timeout_s},
                headers=_idempotent(idempotency_key))


def get_vm(vm_id: str) -> Call[Vm]:
    return Call("GET", _vm(vm_id), Vm.model_validate)


def delete_vm(vm_id: str) -> Call[bool]:
    return Call("DELETE", _vm(vm_id), lambda answer: bool(answer["removed"]))


def console(vm_id: str, lines: int) -> Call[list[str]]:
    return Call("GET", _vm(vm_id, "console"), lambda answer: [str(line) for line in answer["lines"]],
                params={"lines": lines})


def viewer(vm_id: str) -> Call[Viewer]:
    return Call("POST", _vm(vm_id, "viewer"), Viewer.model_validate)


def vm_events(vm_id: str) -> str:
    """GET: `stage` for each hop passed (those already passed first), `build`/`retry` notes, then one of
    `ready`, `failed`, `ended` or `destroyed`, and the stream ends."""
    return _vm(vm_id, "events")


def diagnose(vm_id: str) -> Call[dict[str, Any]]:
    return Call("GET", _vm(vm_id, "diagnose"), _json)


def doctor() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/doctor", _json)


# --- logins and credentials --------------------------------------------------------------------------

def start_login(user: str, provider: str, vm_id: str | None, keep_vm: bool,
                idempotency_key: str | None) -> Call[StartedLogin]:
    body: dict[str, Any] = {"user": user, "provider": provider, "keep_vm": keep_vm}
    if vm_id is not None:
        body["vm_id"] = validate_vm_id(vm_id)
    return Call("POST", "/v1/logins", StartedLogin.model_validate, body=body, headers=_idempotent(idempotency_key))


def list_logins(user: str | None, state: str | None = None) -> Call[list[Login]]:
    params: dict[str, str | int | bool | list[str]] = {"limit": PAGE}
    for name, value in (("user", user), ("state", state)):
        if value is not None:
            params[name] = value
    return Call("GET", "/v1/logins", _list(Login.model_validate), params=params, paged=True)


def get_login(login_id: str) -> Call[Login]:
    return Call("GET", _login(login_id), Login.model_validate)


def cancel_login(login_id: str) -> Call[CancelledLogin]:
    return Call("DELETE", _login(login_id), CancelledLogin.model_validate)


def login_events(login_id: str) -> str:
    """GET: the login now, then at each change (the event is its state), until it is final."""
    return _login(login_id, "events")


def providers() -> Call[list[Provider]]:
    return Call("GET", "/v1/providers", _list(Provider.model_validate))


def credentials(user: str, provider: str) -> Call[Credentials]:
    return Call("GET", _credentials(user, provider), Credentials.model_validate)


def forget_credentials(user: str, provider: str) -> Call[bool]:
    return Call("DELETE", _credentials(user, provider), lambda answer: bool(answer["removed"]))


def _profile(user: str) -> str:
    return f"/v1/users/{quote(_given('user', user), safe='')}/profile"


def profile(user: str) -> Call[Profile]:
    return Call("GET", _profile(user), Profile.model_validate)


def forget_profile(user: str) -> Call[bool]:
    return Call("DELETE", _profile(user), lambda answer: bool(answer["removed"]))


# --- a cluster's front -------------------------------------------------------------------------------

def hosts() -> Call[list[Host]]:
    return Call("GET", "/v1/hosts", _list(Host.model_validate))


def drain_host(name: str) -> Call[Host]:
    return Call("POST", f"/v1/hosts/{quote(_given('name', name), safe='')}/drain", Host.model_validate)


def resume_host(name: str) -> Call[Host]:
    return Call("POST", f"/v1/hosts/{quote(_given('name', name), safe='')}/resume", Host.model_validate)


# --- keys, tenants and the audit trail ----------------------------------------------------------------

def _key(key_id: str) -> str:
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidInput("key_id", key_id, "must be 1-32 of a-z and 0-9 (as `key list` shows it)")
    return f"/v1/keys/{key_id}"


def validate_tenant(value: str) -> str:
    if not isinstance(value, str) or not TENANT.fullmatch(value):
        raise InvalidInput("tenant", value, "must be 1-32 of a-z, 0-9 and '-', starting with a letter or digit")
    return value


def _tenant(tenant: str, *rest: str) -> str:
    return "/".join((f"/v1/tenants/{quote(validate_tenant(tenant), safe='')}", *rest))


def create_key(name: str, role: str, tenant: str | None) -> Call[NewKey]:
    body: dict[str, Any] = {"name": name, "role": role}
    if tenant is not None:
        body["tenant"] = tenant
    return Call("POST", "/v1/keys", NewKey.model_validate, body=body)


def list_keys(tenant: str | None) -> Call[list[ApiKey]]:
    return Call("GET", "/v1/keys", _list(ApiKey.model_validate),
                params=None if tenant is None else {"tenant": validate_tenant(tenant)})


def revoke_key(key_id: str) -> Call[ApiKey]:
    return Call("DELETE", _key(key_id), ApiKey.model_validate)


def get_tenant(tenant: str) -> Call[Tenant]:
    return Call("GET", _tenant(tenant), Tenant.model_validate)


def set_clipboard(tenant: str, clipboard: str) -> Call[str]:
    return Call("PUT", _tenant(tenant, "clipboard"), lambda answer: str(answer["clipboard"]),
                body={"clipboard": clipboard})


def set_quota(tenant: str, quota: Quota) -> Call[Quota]:
    """The whole quota: a limit left None is none."""
    body = {name: getattr(quota, name) for name in ("max_vms", "max_mem_mib", "logins_per_hour")}
    return Call("PUT", _tenant(tenant, "quota"), Quota.model_validate, body=body)


def audit(since: float | None, tenant: str | None, vm_id: str | None, after: int | None,
          limit: int | None) -> Call[AuditPage]:
    params: dict[str, str | int | bool] = {}
    if since is not None:
        params["since"] = str(since)
    if tenant is not None:
        params["tenant"] = validate_tenant(tenant)
    if vm_id is not None:
        params["vm"] = validate_vm_id(vm_id)
    if after is not None:
        params["after"] = after
    if limit is not None:
        params["limit"] = limit
    return Call("GET", "/v1/audit", AuditPage.model_validate, params=params or None)
