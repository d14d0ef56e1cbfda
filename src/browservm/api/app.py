"""The controller's HTTP API: routes that translate HTTP to ControllerService calls, and errors to
status codes, in one place.

    operator (API key: `Authorization: Bearer KEY`, or the session cookie the login form sets)
      POST   /v1/vms[?wait=true]          create: 202 with the record while it boots (200 when waited for)
      GET    /v1/vms, /v1/vms/{id}        records, with viewers and idle time
      DELETE /v1/vms/{id}                 destroy (idempotent)
      GET    /v1/vms/{id}/console?lines=N the serial console's last lines
      GET    /v1/vms/{id}/events          Server-Sent Events: each hop as it passes, then ready/failed
      POST   /v1/vms/{id}/viewer          a viewer link with a short-lived token bound to the VM
      GET    /readyz /metrics /openapi.json /docs /
    anyone
      GET    /healthz
    viewer (its token)
      GET    /view/{id}?token=            the noVNC page
      GET    /view/{id}/state?token=      what the page shows while the VM boots, and its toolbar after
      POST   /view/{id}/token             an open viewer's next link, for its token (in a JSON body) while valid
      WS     /v1/vms/{id}/vnc?token=      the desktop, through the proxy (closes 44xx with a reason)

Errors are `{"error": {"type", "message", ...}}`: 422 a bad field (named), 404 an unknown VM,
409 a VM in the wrong state, 429 a limit, 413 a body over 64 KiB, 401 no or a wrong key.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, Query, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import StringConstraints
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from browservm import __version__
from browservm.access.principal import TENANT_PATTERN, Forbidden
from browservm.api import access_routes, diagnose, idempotency, logins, profiles, webhook_routes
from browservm.api.audited import Audited, audited
from browservm.api.auth import SESSION_COOKIE, Access, ApiError, Caller, admin_only, caller
from browservm.api.idempotency import Idempotent
from browservm.api.logs import AccessLog
from browservm.api.models import (
    USER_PATTERN,
    ConsoleOut,
    CreateVm,
    ErrorOut,
    ExtendVm,
    RenewViewer,
    TemplateOut,
    ViewerOut,
    VmId,
    VmOut,
)
from browservm.api.paging import CURSOR_PATTERN, MAX_PAGE, NEXT_PAGE_HEADERS, cursor_number, next_page
from browservm.api.service import ControllerService
from browservm.api.tokens import TokenRefused
from browservm.cluster.errors import HostError, NoCapacity, RecordConflict
from browservm.errors import (
    BrowserVMError,
    CleanupFailed,
    InvalidInput,
    LimitExceeded,
    ProfileInUse,
    ProfileNotFound,
    StateConflict,
    VmNotFound,
    WrongState,
)
from browservm.ids import validate_vm_id
from browservm.templates import NAME_PATTERN as TEMPLATE_PATTERN
from browservm.vm import hops
from browservm.vm.create import normalise_user
from browservm.vm.desktop_path import desktop_path
from browservm.vm.records import VmQuery
from browservm.vm.state import VmState

log = logging.getLogger("browservm.api")
MAX_BODY = 64 * 1024
LABEL_FILTER = r"^[a-z0-9][a-z0-9._/-]{0,62}=[^\x00-\x1f\x7f]{0,256}$"


LabelFilter = Annotated[str, StringConstraints(pattern=LABEL_FILTER)]


def complete_document(openapi: dict[str, Any], providers: Iterable[str],
                      templates: Iterable[str] = ()) -> dict[str, Any]:
    """What FastAPI cannot know from the routes, added to their OpenAPI document: the statuses every route can
    answer (a key refused, a field refused, a body too large, the host unable), the Idempotency-Key header
    the middleware takes, the login providers the catalog has, the templates the controller serves. In place
    (FastAPI keeps the document it made)."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for path, operations in openapi.get("paths", {}).items():
        for method, operation in operations.items():
            answers = operation.setdefault("responses", {})
            statuses = ((["401", "403"] if operation.get("security") else [])
                        + (["404"] if "{" in path else [])
                        + (["422"] if operation.get("parameters") or operation.get("requestBody") else [])
                        + (["413"] if operation.get("requestBody") else [])
                        + (["503"] if path.startswith("/v1/") else [])
                        + (["409"] if method == "post" and path.startswith("/v1/") else []))
            for status in statuses:
                answers.setdefault(status, {"description": HTTP_REASONS.get(status, "an error"), **error})
    login = openapi.get("components", {}).get("schemas", {}).get("CreateLogin")
    if login is not None:  # the catalog's names: what the login service takes (it names the others' refusal)
        login["properties"]["provider"]["enum"] = list(providers)
    create = openapi.get("components", {}).get("schemas", {}).get("CreateVm")
    names = list(templates)
    if create is not None and names:  # what the manager takes (it names the others' refusal)
        create["properties"]["template"]["enum"] = names
    for operation in openapi.get("paths", {}).get("/v1/vms", {}).values():
        for parameter in operation.get("parameters", ()):
            if parameter.get("name") == "template" and names:
                parameter["schema"] = {"anyOf": [{"type": "string", "enum": names}, {"type": "null"}]}
    return idempotency.document(openapi)


HTTP_REASONS = {"401": "no key, a wrong one or a revoked one", "403": "a key that may not do this",
                "404": "nothing of that name (or another tenant's)",
                "409": "a state that does not allow it, or an Idempotency-Key used for another request",
                "422": "a field refused: `field` names it", "413": "a body over 64 KiB",
                "503": "the controller cannot do it now (its store, network or VMM): `message` says why"}


def operation_id(route: APIRoute) -> str:
    """Each operation named after its route's function, in camelCase (createVm, listLogins): what a generated
    client calls its methods."""
    first, *rest = route.name.split("_")
    return first + "".join(word.capitalize() for word in rest)


NOVNC_DIR = Path("/usr/share/novnc")
_STATIC = resources.files("browservm.api") / "static"
# Swagger UI 5 (the first to read OpenAPI 3.1, which FastAPI writes) from the fastapi-swagger package, so /docs
# works without internet. Only its files: the package's directory also holds its Python.
SWAGGER_UI = Path(str(resources.files("fastapi_swagger.resources")))
SWAGGER_FILES = frozenset({"swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png"})


def _error(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _status_of(exc: BrowserVMError) -> tuple[int, dict[str, str | None]]:
    """One place for what each kind of error means in HTTP."""
    if isinstance(exc, InvalidInput):
        return 422, {"field": exc.field}
    if isinstance(exc, VmNotFound):
        return 404, {}
    if isinstance(exc, LimitExceeded):
        return 429, {"limit": exc.limit}
    if isinstance(exc, WrongState):
        return 409, {"state": exc.state}
    if isinstance(exc, StateConflict):
        return 409, {"state": exc.found or "deleted"}
    if isinstance(exc, ProfileInUse):
        return 409, {"vm_id": exc.vm_id}
    if isinstance(exc, ProfileNotFound):
        return 404, {}
    if isinstance(exc, CleanupFailed):
        return 500, {}
    if isinstance(exc, NoCapacity):
        return 429, {"limit": "capacity"}
    if isinstance(exc, RecordConflict):
        return 409, {}
    if isinstance(exc, HostError):
        return 502, {"host": exc.host}
    return 503, {}  # the host cannot do it now: network, VMM, state directory


class BodyLimit:
    """413 for a request body over `limit` bytes, announced or streamed, before the app reads any of it.

    The body is read here (at most `limit` bytes) and handed on whole. Refusing a streamed body from
    inside the app's own read does not work: FastAPI turns any error raised there into its 400
    "There was an error parsing the body".
    """

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                pending = [message]  # the client left while sending: the app learns it at its first read
                break
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
                break

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, {"type": "BodyTooLarge", "message": f"the body is over {self.limit} bytes"})
        await response(scope, receive, send)


def viewer_page() -> HTMLResponse:
    """The viewer's page (it reads its VM and token from its own URL): a controller's, or a front's."""
    page = (_STATIC / "viewer.html").read_text()
    return HTMLResponse(page, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})


def answer_errors(app: FastAPI) -> None:
    """Every error as browservm's JSON body with the status its kind means (one mapping for every app)."""
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.body, headers)

    @app.exception_handler(Forbidden)
    async def forbidden(request: Request, exc: Forbidden) -> JSONResponse:
        return _error(403, {"type": "Forbidden", "message": str(exc)})

    @app.exception_handler(BrowserVMError)
    async def browservm_error(request: Request, exc: BrowserVMError) -> JSONResponse:
        status, fields = _status_of(exc)
        if status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc)
        return _error(status, {"type": type(exc).__name__, "message": str(exc),
                               **{k: v for k, v in fields.items() if v is not None}})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        # A body that is not JSON at all is located by a character offset, which names no field.
        where = [] if first.get("type") == "json_invalid" else [
            str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
        field = ".".join(where) or "body"
        return _error(422, {"type": "InvalidInput", "field": field, "message": f"{field}: {first.get('msg')}"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            # FastAPI's 400 for a JSON body that is not even UTF-8: bad input like any other undecodable body.
            return _error(422, {"type": "InvalidInput", "field": "body", "message": "body: not UTF-8 JSON"})
        headers = dict(exc.headers) if exc.headers else {}
        if exc.status_code == 405:
            # A 405 says which methods the path has. Starlette's names those of the first route that matched
            # the path only, and /v1/vms and /v1/vms/{id} are two routes each.
            headers["Allow"] = ", ".join(sorted({method for route in app.routes if isinstance(route, APIRoute)
                                                 and route.path_regex.match(request.url.path)
                                                 for method in route.methods or ()}))
        return _error(exc.status_code, {"type": "HTTPError", "message": str(exc.detail)}, headers or None)


def mount_operator_page(app: FastAPI, access: Access, *, secure: bool) -> None:
    """The operator's page at `/`, its sign-in form and sign-out (a controller's, or a front's: the page reads
    /v1/vms, which shows a tenant key its own VMs only). A session lasts `access.session_ttl`."""
    @app.get("/", include_in_schema=False, response_model=None)
    def operator_page(request: Request) -> HTMLResponse | RedirectResponse:
        try:
            access.principal(request)
        except ApiError:
            return RedirectResponse("/login", status_code=303)
        return HTMLResponse((_STATIC / "operator.html").read_text(), headers={"Cache-Control": "no-store"})

    @app.get("/login", include_in_schema=False)
    async def login_form(failed: bool = False) -> HTMLResponse:
        page = (_STATIC / "login.html").read_text()
        return HTMLResponse(page.replace("{{message}}", "That key is not right." if failed else ""))

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> RedirectResponse:
        # The form is urlencoded (login.html), read with the standard library: request.form() needs
        # python-multipart, which browservm does not depend on (without it every login was a 500).
        form = parse_qs((await request.body()).decode(errors="replace"))
        key = form.get("key", [""])[0].strip()
        principal = await asyncio.to_thread(access.keys.authenticate, key)
        if principal is None:
            return RedirectResponse("/login?failed=true", status_code=303)
        request.state.principal = principal
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(SESSION_COOKIE, access.session(principal), max_age=int(access.session_ttl),
                            httponly=True, samesite="strict", secure=secure)
        return response

    @app.post("/logout", include_in_schema=False)
    async def logout() -> RedirectResponse:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", secure=secure)
        return response


def build_app(service: ControllerService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # Shutdown of the service itself is the server's (serve.py): viewers first, then this.

    app = FastAPI(title="browservm", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, generate_unique_id_function=operation_id,
                  description="Isolated browser microVMs: create one per user session, "
                  "watch it come up hop by hop, open its desktop in a browser.")
    app.add_middleware(Idempotent, records=service.idempotency)
    build_document = app.openapi
    app.openapi = lambda: app.openapi_schema or complete_document(  # type: ignore[method-assign]
        build_document(), app.state.logins.catalog.names(), service.manager.templates.names())
    app.add_middleware(BodyLimit)
    app.add_middleware(Audited, trail=service.audit)
    app.add_middleware(AccessLog)  # outermost: it times and logs what BodyLimit refuses too

    app.state.access = access = service.access
    admin = [Depends(admin_only)]
    authorized = [Depends(caller)]
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorOut}
                                              for code in (401, 403, 404, 409, 413, 422, 429)}

    answer_errors(app)

    # --- health, metrics, docs ---------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        """Liveness: the controller answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"], dependencies=admin, responses=errors)
    async def readyz() -> JSONResponse:
        """Readiness: the store answers, the host network is as `host up` makes it, a VMM can run."""
        checks = await service.readiness()
        healthy = all(ok for ok, _ in checks.values())
        return JSONResponse({"ok": healthy, "checks": {name: {"ok": ok, "detail": detail}
                                                      for name, (ok, detail) in checks.items()}},
                            status_code=200 if healthy else 503)

    @app.get("/metrics", tags=["health"], dependencies=admin, response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(await asyncio.to_thread(service.metrics.render),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/openapi.json", include_in_schema=False, dependencies=authorized)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=authorized)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="browservm API",
                                   swagger_js_url="/swagger/swagger-ui-bundle.js",
                                   swagger_css_url="/swagger/swagger-ui.css",
                                   swagger_favicon_url="/swagger/favicon-32x32.png")

    @app.get("/swagger/{name}", include_in_schema=False, dependencies=authorized)
    async def swagger_file(name: str) -> FileResponse:
        if name not in SWAGGER_FILES:
            raise ApiError(404, "NotFound", f"no Swagger UI file named {name!r}")
        return FileResponse(SWAGGER_UI / name)

    # --- VMs -----------------------------------------------------------------------------------

    @app.post("/v1/vms", tags=["vms"], status_code=202, response_model=VmOut,
              responses={**errors, 200: {"model": VmOut, "description": "with ?wait=true: ready, or failed"}})
    async def create_vm(body: CreateVm, who: Caller, request: Request, wait: bool = False) -> JSONResponse:
        """Create a VM. It boots in the background (202, state `creating`); `?wait=true` returns when it is
        ready or failed (200). Follow it with GET /v1/vms/{id} or /v1/vms/{id}/events."""
        record = await service.create(body, wait, who)
        audited(request, record.vm_id, record.tenant)
        return JSONResponse(service.describe(record).model_dump(mode="json"), status_code=200 if wait else 202)

    @app.get("/v1/vms", tags=["vms"], responses={**errors, 200: {"headers": NEXT_PAGE_HEADERS}})
    async def list_vms(who: Caller, request: Request, response: Response, *,
                       limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
                       cursor: Annotated[str | None, Query(pattern=CURSOR_PATTERN,
                                                          description="X-Next-Cursor of the page before")] = None,
                       user: Annotated[str | None, Query(pattern=USER_PATTERN)] = None,
                       state: VmState | None = None,
                       label: Annotated[list[LabelFilter] | None,
                                        Query(description="key=value; VMs with every one")] = None,
                       tenant: Annotated[str | None, Query(pattern=f"{TENANT_PATTERN}|^$",
                                                           description="admin keys: one tenant's only")] = None,
                       template: Annotated[str | None, Query(pattern=TEMPLATE_PATTERN,
                                                             description="VMs made from this template")] = None,
                       ) -> list[VmOut]:
        """The VMs this key may see (an admin key: every tenant's; a tenant key: its own), in the order they
        appeared, a page at a time: `X-Next-Cursor` (and `Link: rel=next`) give the next page while there is
        one. A VM created while a client pages comes on a later page: none is skipped or repeated."""
        if template is not None:
            service.manager.template(template)  # one the controller has (the document's enum): else a 422
        query = VmQuery(after=0 if cursor is None else cursor_number(cursor), limit=limit, tenant=tenant,
                        user=None if user is None else normalise_user(user), state=None if state is None else
                        state.value, labels=dict(item.split("=", 1) for item in label or ()), template=template)
        records, last = await service.page(query, who)
        if last is not None:
            next_page(request, response, service.settings.base_url, last)
        return [service.describe(record) for record in records]

    @app.get("/v1/templates", tags=["vms"], responses=errors)
    async def list_templates(who: Caller) -> list[TemplateOut]:
        """The templates VMs are made from (POST /v1/vms `template`), with the size of each one's warm pool.
        A tenant key is not shown where image files lie on the host (`rootfs`: its file name only)."""
        pools = service.manager.pools
        listed = [TemplateOut.of(template, pools[template.name].settings.size if template.name in pools else 0)
                  for template in service.manager.templates]
        if not who.admin:
            for template in listed:
                template.rootfs = None if template.rootfs is None else Path(template.rootfs).name
        return listed

    @app.get("/v1/vms/{vm_id}", tags=["vms"], responses=errors)
    async def get_vm(vm_id: VmId, who: Caller) -> VmOut:
        """State, address, the failing hop with reason and hint, each hop's time, viewers, idle time."""
        return service.describe(await service.get(validate_vm_id(vm_id), who))

    @app.delete("/v1/vms/{vm_id}", tags=["vms"], responses=errors)
    async def delete_vm(vm_id: VmId, who: Caller) -> dict[str, str | bool]:
        """Stop the VM and release everything it had. Idempotent: `removed` is false when it was not there."""
        return {"vm_id": vm_id, "removed": await service.destroy(validate_vm_id(vm_id), who)}

    @app.get("/v1/vms/{vm_id}/console", tags=["vms"], responses=errors)
    async def console(vm_id: VmId, who: Caller, lines: Annotated[int, Query(ge=1, le=10_000)] = 50) -> ConsoleOut:
        return ConsoleOut(vm_id=vm_id, lines=await service.console(validate_vm_id(vm_id), lines, who))

    @app.get("/v1/vms/{vm_id}/events", tags=["vms"], responses=errors, response_class=StreamingResponse)
    async def events(vm_id: VmId, who: Caller) -> StreamingResponse:
        """Server-Sent Events: `stage` for each hop as it passes (those already passed first), then one of
        `ready`, `failed` (with the hop and reason), `ended` or `destroyed`, and the stream ends."""
        await service.get(validate_vm_id(vm_id), who)  # a 404 now, not an empty stream

        async def stream() -> AsyncIterator[str]:
            async for event in service.stream(vm_id):
                yield event.sse()
        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.post("/v1/vms/{vm_id}/extend", tags=["vms"], responses=errors)
    async def extend_vm(vm_id: VmId, body: ExtendVm, who: Caller) -> VmOut:
        """End the VM `timeout_s` from now instead of when it would have ended (within its maximum lifetime)."""
        return service.describe(await service.extend(validate_vm_id(vm_id), body.timeout_s, who))

    @app.post("/v1/vms/{vm_id}/viewer", tags=["viewer"], responses=errors)
    async def viewer(vm_id: VmId, who: Caller) -> ViewerOut:
        """A link to the VM's desktop for a browser, valid for the configured time (default 10 minutes)."""
        return await service.viewer(validate_vm_id(vm_id), who)

    # --- the viewer: its own token, no API key --------------------------------------------------

    @app.get("/view/{vm_id}", tags=["viewer"], response_class=HTMLResponse)
    async def view(vm_id: str, token: str = "") -> HTMLResponse:
        return viewer_page()

    refusals: dict[int | str, dict[str, Any]] = {401: {"model": ErrorOut, "description": "the token is refused"},
                                                 404: {"model": ErrorOut, "description": "no VM of that id"}}

    @app.get("/view/{vm_id}/state", tags=["viewer"], responses=refusals)
    async def view_state(vm_id: VmId, token: str = "") -> JSONResponse:
        """What the viewer page shows while the VM boots: its state, the last hop passed, a failure."""
        try:
            record = await service.check_token(vm_id, token)
        except TokenRefused as exc:
            return _error(401, {"type": "TokenRefused", "message": exc.reason})
        except (VmNotFound, InvalidInput):
            return _error(404, {"type": "VmNotFound", "message": f"no VM {vm_id[:63]}"})
        failure = record.failure
        paste, copy = await service.clipboard_of(record)
        return JSONResponse({"state": record.state.value, "stages": list(record.stages),
                             "expires_at": service.expires_at(record), "clipboard": {"paste": paste, "copy": copy},
                             "hops": list(desktop_path(record.desktop_path).names),
                             "browser_ready": hops.DESKTOP_COMPLETE in record.stages,
                             "building": service.building(record, for_viewer=True),
                             "failure": None if failure is None else {"hop": failure.hop, "reason": failure.reason},
                             "ended_reason": record.ended_reason or None},
                            headers={"Cache-Control": "no-store"})

    @app.post("/view/{vm_id}/token", tags=["viewer"], response_model=ViewerOut,
              responses={**refusals, 409: {"model": ErrorOut, "description": "the VM is not booting or ready"}})
    async def renew_viewer(vm_id: VmId, body: RenewViewer) -> ViewerOut | JSONResponse:
        """The next link of an open viewer, for its still valid token (in the body, not the address): the
        page takes it before its token expires, so a session outlives a link; never past the VM's end."""
        try:
            return await service.renew_viewer(vm_id, body.token)
        except TokenRefused as exc:
            return _error(401, {"type": "TokenRefused", "message": exc.reason})
        except (VmNotFound, InvalidInput):
            return _error(404, {"type": "VmNotFound", "message": f"no VM {vm_id[:63]}"})

    @app.websocket("/v1/vms/{vm_id}/vnc")
    async def vnc(websocket: WebSocket, vm_id: str, token: str = "") -> None:
        await service.connect_viewer(websocket, vm_id, token)

    mount_operator_page(app, access, secure=service.settings.base_url.startswith("https:"))

    logins.mount(app, service)
    profiles.mount(app, service)
    diagnose.mount(app, service)
    access_routes.mount(app, service)
    webhook_routes.mount(app, service)  # after logins.mount: it listens to their ends
    if NOVNC_DIR.is_dir():
        app.mount("/novnc", StaticFiles(directory=NOVNC_DIR), name="novnc")
    return app

