"""Logins (issue 9): POST /v1/logins and its companions, the OAuth agent's client, the credential vault's routes.

    operator (API key)
      POST   /v1/logins {user, provider, vm_id?, keep_vm?,  202: the login (booting) and its viewer link, at once
                      keep_profile?}
      GET    /v1/logins[?user=U]                            the newest logins
      GET    /v1/logins/{id}                                state, VM, auth URL host, hop and reason, output
      GET    /v1/logins/{id}/events                         Server-Sent Events: the login at each change, to the end
      DELETE /v1/logins/{id}                                cancel (the tool is stopped, the VM destroyed)
      GET    /v1/providers                                  the catalog (no secrets in it)
      GET    /v1/users/{user}/credentials/{provider}        the captured files (base64), decrypted
      DELETE /v1/users/{user}/credentials/{provider}        forget them

Errors of this part map to statuses here, beside app.py's mapping of the rest: 404 an unknown login
or no credentials, 409 a login already running for the user and provider (or a state change refused),
422 an unknown provider (field `provider`), 503 the vault or the catalog cannot be used.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.responses import StreamingResponse

from browservm.access.audit import AuditEntry
from browservm.access.principal import TENANT_PATTERN, Principal
from browservm.api.audited import audited
from browservm.api.auth import Caller, caller
from browservm.api.paging import CURSOR_PATTERN, MAX_PAGE, NEXT_PAGE_HEADERS, cursor_number, next_page
from browservm.ids import VM_ID_PATTERN, validate_vm_id
from browservm.names import NAME_PATTERN
from browservm.oauth.catalog import load_catalog
from browservm.oauth.errors import (
    CredentialsNotFound,
    LoginConflict,
    LoginError,
    LoginNotFound,
    LoginRunning,
    LoginTransition,
    UnknownProvider,
)
from browservm.oauth.records import LOGIN_ID_PATTERN, LoginRecord, LoginRecords
from browservm.oauth.service import LoginService
from browservm.oauth.states import LoginState
from browservm.oauth.vault import Vault, load_key
from browservm.store import Store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from browservm.api.service import ControllerService

_PROVIDER = r"^[a-z0-9][a-z0-9._-]{0,63}$"
# At module level: FastAPI resolves route annotations by name here.
User = Annotated[str, Path(pattern=NAME_PATTERN, max_length=64)]
ProviderName = Annotated[str, Path(pattern=_PROVIDER)]
# Documented, and enforced by validate_login_id in its words.
LoginId = Annotated[str, Path(json_schema_extra={"pattern": LOGIN_ID_PATTERN, "maxLength": 18})]
Tenant = Annotated[str | None, Query(pattern=f"{TENANT_PATTERN}|^$",
                                     description="an admin key's choice of tenant (default: the operator's own, or "
                                                 "everyone's in a listing); a tenant key's is its own")]


class CreateLogin(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user: StrictStr = Field(min_length=1, max_length=64, pattern=NAME_PATTERN,
                            description="whose login it is; the credentials are theirs")
    provider: StrictStr = Field(min_length=1, max_length=64, description="a provider (GET /v1/providers)")
    vm_id: StrictStr | None = Field(None, description="run the login in this VM of the user's instead of a new one",
                                    json_schema_extra={"pattern": VM_ID_PATTERN, "maxLength": 63})
    keep_vm: StrictBool = Field(False, description="keep the VM afterwards (default: it is destroyed)")
    keep_profile: StrictBool = Field(False, description="the login's VM has the user's persistent browser profile "
                                                        "(as a VM created with profile: persistent): a sign-in at "
                                                        "the provider is remembered for the user's next VM")
    tenant: StrictStr | None = Field(None, pattern=TENANT_PATTERN,
                                     description="an admin key may name the tenant; a tenant key's is its own")


class LoginOut(BaseModel):
    login_id: str
    user: str
    tenant: str = Field(description="the tenant it belongs to; empty: the operator's own")
    provider: str
    state: str = Field(description="booting, starting, waiting-for-user, captured, failed, timed-out or cancelled")
    vm_id: str
    keep_vm: bool
    vm_destroyed: bool
    created_at: float
    ended_at: float | None
    states: dict[str, float] = Field(description="seconds after the request each state was reached")
    auth_url_host: str | None = Field(description="whose page the person should expect in the viewer")
    hop: str | None = Field(description="where a failure happened: a VM hop, agent.*, tool, vault, controller")
    reason: str | None
    exit_status: int | None = Field(description="the tool's exit status, when it failed")
    output: list[str] = Field(description="the tool's last lines, when it failed")
    files: int = Field(description="credentials files captured")
    sha256: str | None = Field(description="hash of the captured files, as the agent printed it on the console")

    @classmethod
    def of(cls, login: LoginRecord) -> LoginOut:
        return cls(login_id=login.login_id, user=login.user, tenant=login.tenant, provider=login.provider,
                   state=login.state.value,
                   vm_id=login.vm_id, keep_vm=login.keep_vm, vm_destroyed=login.vm_destroyed,
                   created_at=login.created_at, ended_at=login.ended_at, states=login.states,
                   auth_url_host=login.auth_url_host, hop=login.hop, reason=login.reason,
                   exit_status=login.exit_status, output=login.output, files=login.files, sha256=login.sha256)


class StartedOut(LoginOut):
    viewer_url: str = Field(description="the VM's desktop in a browser, where the person completes the login")


class CancelOut(BaseModel):
    login: LoginOut
    cancelled: bool = Field(description="false when the login had already ended")


class CredentialsOut(BaseModel):
    user: str
    provider: str
    login_id: str
    captured_at: float
    files: dict[str, str] = Field(description="path inside the VM -> the file's bytes in base64")


class ProviderOut(BaseModel):
    name: str
    package: str
    browser: str
    callback: str
    credentials: list[str]
    timeout_s: int


def _status_of(exc: LoginError) -> tuple[int, dict[str, str]]:
    """This part's errors in HTTP: one place, as app.py's `_status_of` is for the rest."""
    if isinstance(exc, UnknownProvider):
        return 422, {"type": "InvalidInput", "field": "provider"}
    if isinstance(exc, (LoginNotFound, CredentialsNotFound)):
        return 404, {}
    if isinstance(exc, LoginRunning):
        return 409, {"state": "running"}
    if isinstance(exc, (LoginTransition, LoginConflict)):
        return 409, {}
    return 503, {}  # the vault, the catalog, an agent: the controller cannot do it now


def make_logins(service: ControllerService) -> LoginService:
    """The login service over the controller's manager and store. Blocking (reads the catalog and the key)."""
    settings = service.settings
    catalog = load_catalog(settings.providers_file)
    key = load_key(settings.state_dir, settings.vault_key.get_secret_value() if settings.vault_key else None)
    # A connection of its own to the state database (SQLite serialises writers across connections).
    store = Store(settings.database)

    async def viewer(vm_id: str) -> str:
        return (await service.viewer(vm_id)).url

    logins = LoginService(manager=service.manager, records=LoginRecords(store), vault=Vault(store, key),
                          catalog=catalog, netns=service.network.netns, state_dir=settings.state_dir,
                          viewer=viewer, mem_mib=settings.login_mem_mib,
                          agent_wait_s=float(settings.login_agent_wait))
    logins.on_close = store.close
    return logins


def mount(app: FastAPI, service: ControllerService) -> None:
    """Add this part's routes to `app`, and its tasks to `service` (`run_in_background`, `on_stop`)."""
    # A wrong catalog or vault key stops the controller at its start, naming the file, provider and field:
    # better than a controller that takes logins it cannot run.
    logins = make_logins(service)
    app.state.logins = logins  # tests and the benchmark reach the service here (its `agent_endpoint`)

    async def reconcile() -> None:
        for action in await logins.reconcile():
            print(f"reconcile: {action}", flush=True)

    service.run_in_background(reconcile)
    service.on_stop(logins.stop)

    async def captured(login: LoginRecord) -> None:
        await service.record_audit(AuditEntry("", login.tenant, "login.captured", login.login_id, "captured",
                                              detail=f"{login.user}/{login.provider}: {login.files} files"))

    logins.on_captured = captured

    async def visible(login_id: str, who: Principal) -> LoginRecord:
        login = await logins.get(login_id)
        if not who.sees(login.tenant):
            raise LoginNotFound(login_id)
        return login

    @app.exception_handler(LoginError)
    async def login_error(request: Request, exc: LoginError) -> JSONResponse:
        status, fields = _status_of(exc)
        body: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), **fields}
        return JSONResponse({"error": body}, status_code=status)

    authorized = [Depends(caller)]

    responses: dict[int | str, dict[str, Any]] = {code: {"description": "an error: {\"error\": {type, message}}"}
                                                  for code in (401, 404, 409, 422, 429, 503)}

    @app.post("/v1/logins", tags=["logins"], status_code=202, responses=responses)
    async def start_login(body: CreateLogin, who: Caller, request: Request) -> StartedOut:
        """Start a provider's login for a user: boots a VM (or uses `vm_id`), returns at once (state `booting`)
        with the viewer link where the person completes it. Follow it with GET /v1/logins/{id} or its events."""
        if body.vm_id is not None:
            validate_vm_id(body.vm_id)
        tenant = who.tenant_for(body.tenant)
        quota = await asyncio.to_thread(service.quotas.get, tenant)
        started = await logins.start(body.user, body.provider, body.vm_id, body.keep_vm, tenant=tenant, quota=quota,
                                     keep_profile=body.keep_profile)
        audited(request, started.login.login_id, tenant)
        return StartedOut(**LoginOut.of(started.login).model_dump(), viewer_url=started.viewer_url)

    @app.get("/v1/logins", tags=["logins"], responses={**responses, 200: {"headers": NEXT_PAGE_HEADERS}})
    async def list_logins(who: Caller, request: Request, response: Response, *,
                          user: Annotated[str | None, Query(max_length=64)] = None, tenant: Tenant = None,
                          state: LoginState | None = None, limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                          cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN,
                                                             description="X-Next-Cursor of the page before")] = None,
                          ) -> list[LoginOut]:
        """The logins this key may see (of `user`, in `state`; an admin key may name a `tenant`), newest first,
        a page at a time: `X-Next-Cursor` (and `Link: rel=next`) give the next page while there is one."""
        found, last = await logins.all(user, who.tenant_filter(tenant), limit=limit,
                                       state=None if state is None else state.value,
                                       before=None if cursor is None else cursor_number(cursor))
        if last is not None:
            next_page(request, response, service.settings.base_url, last)
        return [LoginOut.of(login) for login in found]

    @app.get("/v1/logins/{login_id}", tags=["logins"], responses=responses)
    async def get_login(login_id: LoginId, who: Caller) -> LoginOut:
        return LoginOut.of(await visible(login_id, who))

    @app.get("/v1/logins/{login_id}/events", tags=["logins"], responses=responses, response_class=StreamingResponse)
    async def login_events(login_id: LoginId, who: Caller) -> StreamingResponse:
        """Server-Sent Events: the login now, then again at each change (the event is its state), until
        captured, failed, timed-out or cancelled; then the stream ends."""
        await visible(login_id, who)  # a 404 now, not an empty stream

        async def stream() -> AsyncIterator[str]:
            async for login in logins.stream(login_id):
                yield f"event: {login.state.value}\ndata: {LoginOut.of(login).model_dump_json()}\n\n"
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.delete("/v1/logins/{login_id}", tags=["logins"], responses=responses)
    async def cancel_login(login_id: LoginId, who: Caller) -> CancelOut:
        """Cancel a running login: the agent stops the tool, the VM is destroyed (unless keep_vm)."""
        await visible(login_id, who)
        login, cancelled = await logins.cancel(login_id)
        return CancelOut(login=LoginOut.of(login), cancelled=cancelled)

    @app.get("/v1/providers", tags=["logins"], dependencies=authorized, responses=responses)
    async def providers() -> list[ProviderOut]:
        catalog = logins.catalog
        return [ProviderOut(name=p.name, package=p.package, browser=p.browser, callback=p.callback,
                            credentials=list(p.credentials), timeout_s=p.timeout_s)
                for p in (catalog.get(name) for name in catalog.names())]

    @app.get("/v1/users/{user}/credentials/{provider}", tags=["credentials"], responses=responses)
    async def get_credentials(user: User, provider: ProviderName, who: Caller, request: Request,
                              tenant: Tenant = None) -> JSONResponse:
        """The credentials captured last for this user (of the tenant) and provider: each file's bytes in base64."""
        owner = who.tenant_for(tenant)
        audited(request, f"{user}/{provider}", owner)
        stored = await logins.credentials(user, provider, owner)
        out = CredentialsOut(user=stored.user, provider=stored.provider, login_id=stored.login_id,
                             captured_at=stored.captured_at,
                             files={path: base64.b64encode(data).decode() for path, data in stored.files.items()})
        # no-store: no cache between here and the client keeps a copy
        return JSONResponse(out.model_dump(), headers={"Cache-Control": "no-store"})

    @app.delete("/v1/users/{user}/credentials/{provider}", tags=["credentials"], responses=responses)
    async def delete_credentials(user: User, provider: ProviderName, who: Caller, request: Request,
                                 tenant: Tenant = None) -> dict[str, str | bool]:
        """Forget the credentials. Idempotent: `removed` is false when there were none."""
        owner = who.tenant_for(tenant)
        audited(request, f"{user}/{provider}", owner)
        return {"user": user, "provider": provider, "removed": await logins.forget(user, provider, owner)}

