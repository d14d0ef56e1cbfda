"""Keys, tenants' quotas and the audit trail over HTTP (issue 21).

    admin key
      POST   /v1/keys {name, role, tenant?}        a new key: its secret in this answer only (201)
      GET    /v1/keys[?tenant=T]                   every key: id, name, role, tenant, created, last used, revoked
      DELETE /v1/keys/{key_id}                     revoke (at once; idempotent)
      PUT    /v1/tenants/{tenant}/quota            set a tenant's quota (null: no limit of its own)
      PUT    /v1/tenants/{tenant}/clipboard        which way its viewers' clipboard may go (issue 22)
    admin key, or a tenant key for its own tenant
      GET    /v1/tenants/{tenant}                  its quota and what it uses now
      GET    /v1/audit?since=&tenant=&vm=&after=&limit=   the trail, oldest first; `next` is the next page's `after`
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Annotated, Any, Literal

from annotated_types import Ge, Le
from fastapi import Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from browservm.access.audit import MAX_QUERY
from browservm.access.keys import ApiKey, KeyNotFound, KeyRefused
from browservm.access.principal import TENANT_PATTERN, Role
from browservm.access.quotas import Quota
from browservm.api.audited import audited
from browservm.api.auth import Admin, Caller
from browservm.api.idempotency import no_replay
from browservm.api.models import whole
from browservm.ids import VM_ID_PATTERN
from browservm.names import NAME_PATTERN

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService

TenantName = Annotated[str, Path(pattern=TENANT_PATTERN)]
KeyId = Annotated[str, Path(pattern=r"^[a-z0-9]{1,32}$")]


class CreateKey(BaseModel):
    # A tenant key needs its tenant; an admin key has none (it sees every one): said in the document too.
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "if": {"properties": {"role": {"const": "admin"}}},
        "then": {"properties": {"tenant": {"type": "null"}}},
        "else": {"required": ["tenant"], "properties": {"tenant": {"type": "string"}}}})

    name: StrictStr = Field(min_length=1, max_length=64, pattern=NAME_PATTERN, description="what the key is for, "
                                                                                            "for people")
    role: Role = Field(description="admin: everything; tenant: only its tenant's VMs, logins and credentials")
    tenant: StrictStr | None = Field(None, pattern=TENANT_PATTERN, description="a tenant key's tenant (required "
                                                                              "for role tenant, none for admin)")


class KeyOut(BaseModel):
    key_id: str
    name: str
    role: Role
    tenant: str
    created_at: float
    last_used_at: float | None = Field(description="to the minute: written at most once a minute")
    revoked_at: float | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls(**dataclasses.asdict(key))


class NewKeyOut(KeyOut):
    key: str = Field(description="the key itself: shown in this answer only, kept nowhere")


class QuotaIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # The bounds before the validator: after it, pydantic writes them as no JSON Schema keyword.
    max_vms: Annotated[StrictInt, Ge(0), Le(100_000), BeforeValidator(whole)] | None = Field(
        None, description="live VMs at once (null: no limit)")
    max_mem_mib: Annotated[StrictInt, Ge(0), Le(1 << 30), BeforeValidator(whole)] | None = Field(
        None, description="their memory together, MiB")
    logins_per_hour: Annotated[StrictInt, Ge(0), Le(1_000_000), BeforeValidator(whole)] | None = Field(
        None, description="logins started per hour")


class ClipboardIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clipboard: Literal["both", "paste", "copy", "none"] = Field(
        description="which way its viewers' clipboard may go: both, paste (into the VM only), copy (out of it "
                    "only), none; a VM's template may allow less, never more")


class TenantOut(BaseModel):
    tenant: str
    quota: QuotaIn
    clipboard: str = Field(description="which way its viewers' clipboard may go (PUT .../clipboard)")
    usage: dict[str, int] = Field(description="vms, mem_mib, logins_last_hour: what it uses now")


class AuditOut(BaseModel):
    id: int
    at: float
    key_id: str = Field(description="the key's id (never the key); empty for a viewer, which has a link, not a key")
    tenant: str
    action: str
    target: str
    outcome: str
    detail: str
    request_id: str


class AuditPage(BaseModel):
    entries: list[AuditOut]
    next: int | None = Field(description="pass as `after` for the next page; null: no more now")


def mount(app: FastAPI, service: ControllerService) -> None:
    errors: dict[int | str, dict[str, Any]] = {code: {"description": "an error: {\"error\": {type, message}}"}
                                              for code in (401, 403, 404, 409, 422, 429)}

    @app.exception_handler(KeyNotFound)
    async def no_key(request: Request, exc: KeyNotFound) -> JSONResponse:
        return JSONResponse({"error": {"type": "KeyNotFound", "message": str(exc)}}, status_code=404)

    @app.exception_handler(KeyRefused)
    async def refused(request: Request, exc: KeyRefused) -> JSONResponse:
        return JSONResponse({"error": {"type": "KeyRefused", "message": str(exc)}}, status_code=409)

    @app.post("/v1/keys", tags=["access"], status_code=201, responses=errors)
    async def create_key(body: CreateKey, who: Admin, request: Request) -> NewKeyOut:
        """A new API key. Its secret is in this answer only: store it now."""
        key, secret = await asyncio.to_thread(service.keys.create, body.name, body.role, body.tenant)
        audited(request, key.key_id, key.tenant)
        no_replay(request, f"this Idempotency-Key made key {key.key_id}; its secret was shown once and is not kept")
        return NewKeyOut(**KeyOut.of(key).model_dump(), key=secret)

    @app.get("/v1/keys", tags=["access"], responses=errors)
    async def list_keys(who: Admin,
                        tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None) -> list[KeyOut]:
        return [KeyOut.of(key) for key in await asyncio.to_thread(service.keys.all, tenant)]

    @app.delete("/v1/keys/{key_id}", tags=["access"], responses=errors)
    async def revoke_key(key_id: KeyId, who: Admin) -> KeyOut:
        """Revoke a key: refused from its next request on, its sessions end. Idempotent."""
        return KeyOut.of(await asyncio.to_thread(service.keys.revoke, key_id))

    @app.get("/v1/tenants/{tenant}", tags=["access"], responses=errors)
    async def get_tenant(tenant: TenantName, who: Caller) -> TenantOut:
        who.tenant_filter(tenant)  # a tenant key reads its own only
        quota = await asyncio.to_thread(service.quotas.get, tenant)
        usage = await asyncio.to_thread(service.quotas.usage, tenant, time.time() - 3600)
        clipboard = await asyncio.to_thread(service.quotas.clipboard, tenant)
        return TenantOut(tenant=tenant, quota=QuotaIn(**dataclasses.asdict(quota)), clipboard=clipboard, usage=usage)

    @app.put("/v1/tenants/{tenant}/quota", tags=["access"], responses=errors)
    async def set_quota(tenant: TenantName, body: QuotaIn, who: Admin) -> QuotaIn:
        """A tenant's quota, checked at each create and login; VMs over a lowered quota keep running."""
        await asyncio.to_thread(service.quotas.set, tenant, Quota(**body.model_dump()))
        return body

    @app.put("/v1/tenants/{tenant}/clipboard", tags=["access"], responses=errors)
    async def set_clipboard(tenant: TenantName, body: ClipboardIn, who: Admin) -> ClipboardIn:
        """Which way the tenant's viewers' clipboard may go, over what its VMs' templates allow; a viewer
        connected now keeps what it had, the next one gets this."""
        await asyncio.to_thread(service.quotas.set_clipboard, tenant, body.clipboard)
        return body

    @app.get("/v1/audit", tags=["access"], responses=errors)
    async def audit(who: Caller, *, since: Annotated[float, Query(ge=0)] = 0.0,
                    tenant: Annotated[str | None, Query(pattern=f"{TENANT_PATTERN}|^$")] = None,
                    vm: Annotated[str | None, Query(pattern=VM_ID_PATTERN)] = None,
                    after: Annotated[int, Query(ge=0)] = 0,
                    limit: Annotated[int, Query(ge=1, le=MAX_QUERY)] = 100) -> AuditPage:
        """The audit trail, oldest first: every change, viewer connect and disconnect, login capture and
        credentials read. A tenant key sees its own tenant's entries only."""
        rows = await asyncio.to_thread(service.audit.query, since=since, tenant=who.tenant_filter(tenant),
                                       target=vm, after_id=after, limit=limit)
        return AuditPage(entries=[AuditOut(**dataclasses.asdict(row)) for row in rows],
                         next=rows[-1].id if len(rows) == limit else None)
