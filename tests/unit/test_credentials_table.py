"""Every route and page, for every kind of credential a client can bring, answers its documented
status and never a 5xx (issue 18): none, a wrong one, a viewer token (of this VM, of another VM,
expired), and malformed Unicode. The table names every route the app has; a new route fails the
first test until it is put here with what it answers.

How each kind is sent: to an operator route as the bearer key and (separately) as the session
cookie; to a viewer route as its `token` query; to the login form as its `key` field.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Mount
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from browservm.api.auth import SESSION_COOKIE
from browservm.vm.state import VmState

from .fakes import stop_all
from .test_api import KEY, Served, serve_fakes

Kind = Literal["operator", "viewer-page", "viewer-state", "viewer-renew", "viewer-ws", "public", "operator-page",
               "login-form", "login-page", "static", "logout"]

# Every route of the app: (method, path) -> what guards it. "WS" is the WebSocket route.
ROUTES: dict[tuple[str, str], Kind] = {
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "operator",
    ("GET", "/metrics"): "operator",
    ("GET", "/openapi.json"): "operator",
    ("GET", "/docs"): "operator",
    ("GET", "/swagger/{name}"): "operator",
    ("POST", "/v1/vms"): "operator",
    ("GET", "/v1/vms"): "operator",
    ("GET", "/v1/templates"): "operator",
    ("GET", "/v1/vms/{vm_id}"): "operator",
    ("DELETE", "/v1/vms/{vm_id}"): "operator",
    ("GET", "/v1/vms/{vm_id}/console"): "operator",
    ("GET", "/v1/vms/{vm_id}/events"): "operator",
    ("POST", "/v1/vms/{vm_id}/viewer"): "operator",
    ("POST", "/v1/vms/{vm_id}/extend"): "operator",
    ("GET", "/v1/vms/{vm_id}/diagnose"): "operator",
    ("GET", "/v1/doctor"): "operator",
    ("POST", "/v1/logins"): "operator",
    ("GET", "/v1/logins"): "operator",
    ("GET", "/v1/logins/{login_id}"): "operator",
    ("GET", "/v1/logins/{login_id}/events"): "operator",
    ("DELETE", "/v1/logins/{login_id}"): "operator",
    ("GET", "/v1/providers"): "operator",
    ("GET", "/v1/users/{user}/credentials/{provider}"): "operator",
    ("DELETE", "/v1/users/{user}/credentials/{provider}"): "operator",
    ("GET", "/v1/users/{user}/profile"): "operator",
    ("DELETE", "/v1/users/{user}/profile"): "operator",
    ("POST", "/v1/keys"): "operator",
    ("GET", "/v1/keys"): "operator",
    ("DELETE", "/v1/keys/{key_id}"): "operator",
    ("GET", "/v1/tenants/{tenant}"): "operator",
    ("PUT", "/v1/tenants/{tenant}/quota"): "operator",
    ("PUT", "/v1/tenants/{tenant}/clipboard"): "operator",
    ("GET", "/v1/audit"): "operator",
    ("POST", "/v1/webhooks"): "operator",
    ("GET", "/v1/webhooks"): "operator",
    ("PATCH", "/v1/webhooks/{webhook_id}"): "operator",
    ("DELETE", "/v1/webhooks/{webhook_id}"): "operator",
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): "operator",
    ("GET", "/view/{vm_id}"): "viewer-page",
    ("GET", "/view/{vm_id}/state"): "viewer-state",
    ("POST", "/view/{vm_id}/token"): "viewer-renew",
    ("WS", "/v1/vms/{vm_id}/vnc"): "viewer-ws",
    ("GET", "/"): "operator-page",
    ("GET", "/login"): "login-page",
    ("POST", "/login"): "login-form",
    ("POST", "/logout"): "logout",
    ("GET", "/novnc"): "static",
}

T = TypeVar("T")
CREDENTIALS = ("none", "wrong", "viewer token", "another VM's token", "expired token", "malformed unicode")
TARGET, OTHER = "vm-0000000000a1", "vm-0000000000a2"
PARAMETERS = {"vm_id": TARGET, "login_id": "login-000000000000", "user": "ann", "provider": "sample",
              "name": "swagger-ui.css", "key_id": "0123456789ab", "tenant": "acme", "webhook_id": "wh-0123456789ab"}


def app_routes(served: Served) -> set[tuple[str, str]]:
    found = set()
    for route in served.app.routes:
        if isinstance(route, APIRoute):
            found |= {(method, route.path) for method in route.methods or ()}
        elif isinstance(route, APIWebSocketRoute):
            found.add(("WS", route.path))
        elif isinstance(route, Mount):
            found.add(("GET", route.path))
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    served = serve_fakes(tmp_path_factory.mktemp("table"))
    target = served.insert(VmState.BOOTING, TARGET)  # booting: a valid token is refused 4409, at once
    other = served.insert(VmState.BOOTING, OTHER)
    tokens = served.service.tokens
    expired_at = served.clock.now - 2 * tokens.ttl
    now, served.clock.now = served.clock.now, expired_at
    expired = tokens.issue(TARGET, target.viewer_epoch)[0]
    served.clock.now = now
    credentials = {
        "none": "",
        "wrong": "v1.wrong.9999999999.wrong",
        "viewer token": tokens.issue(TARGET, target.viewer_epoch)[0],
        "another VM's token": tokens.issue(OTHER, other.viewer_epoch)[0],
        "expired token": expired,
        # The right VM and a far expiry, so the signature is compared: one not ASCII was a 500 (issue 18).
        "malformed unicode": f"v1.{TARGET}.9999999999.\u00e9\U0001f600\udcff\u0663\x00",
    }
    try:
        yield served, credentials
    finally:
        stop_all(served.parts)


def test_the_table_names_every_route_the_app_has(served: tuple[Served, dict[str, str]]) -> None:
    assert app_routes(served[0]) == set(ROUTES)


def url_of(path: str) -> str:
    for name, value in PARAMETERS.items():
        path = path.replace("{" + name + "}", value)
    return path + ("/vnc.html" if path == "/novnc" else "")


def as_header(credential: str) -> bytes:
    """What a client can put in a header: bytes (UTF-8 of whatever it was given)."""
    return credential.encode("utf-8", errors="surrogatepass")


async def request(client: httpx.AsyncClient, method: str, url: str, *, headers: dict[str, bytes] | None = None,
                  params: dict[str, str] | None = None, content: bytes | None = None) -> httpx.Response:
    raw = [(name.encode(), value) for name, value in (headers or {}).items()]
    built = client.build_request(method, url, headers=raw, content=content)
    if params is not None:  # a query exactly as given, non-ASCII and lone surrogates percent-encoded
        query = "&".join(f"{k}={quote(v, safe='', errors='surrogatepass')}" for k, v in params.items())
        built.url = built.url.copy_with(query=query.encode())
    return await client.send(built)


def expected(kind: Kind, credential: str) -> int:
    """The documented status (app.py's docstring) for a route of `kind` given `credential`."""
    valid_viewer = credential == "viewer token"
    # A token in a JSON body: one that is no Unicode string (a lone surrogate) is a 422 naming `token`.
    renewal = 200 if valid_viewer else 422 if credential == "malformed unicode" else 401
    return {"operator": 401, "public": 200, "viewer-page": 200, "static": 200,
            "viewer-state": 200 if valid_viewer else 401, "viewer-renew": renewal,
            "viewer-ws": 4409 if valid_viewer else 4401,
            "operator-page": 303, "login-page": 200, "login-form": 303, "logout": 303}[kind]


@pytest.mark.parametrize("credential", CREDENTIALS)
@pytest.mark.parametrize(("method", "path"), sorted(ROUTES))
def test_every_route_answers_its_documented_status_for_every_credential(
        served: tuple[Served, dict[str, str]], method: str, path: str, credential: str) -> None:
    server, credentials = served
    kind, given = ROUTES[(method, path)], credentials[credential]
    if kind == "static" and not Path("/usr/share/novnc").is_dir():
        pytest.skip("noVNC is not installed: /novnc is not mounted")
    url = url_of(path)
    want = expected(kind, credential)

    if kind == "viewer-ws":
        with TestClient(server.app) as client, \
                client.websocket_connect(f"{url}?token={quote(given, safe='', errors='surrogatepass')}") as ws, \
                pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_bytes()
        assert closed.value.code == want, (credential, closed.value.code, closed.value.reason)
        return

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        if kind in ("viewer-page", "viewer-state"):
            return [await request(client, method, url, params={"token": given})]
        if kind == "viewer-renew":  # the token in the body, never in an address
            return [await request(client, method, url, content=json.dumps({"token": given}).encode(),
                                  headers={"Content-Type": b"application/json"})]
        if kind == "login-form":
            body = f"key={quote(given, safe='', errors='surrogatepass')}".encode()
            return [await request(client, method, url, content=body,
                                  headers={"Content-Type": b"application/x-www-form-urlencoded"})]
        content = json.dumps({"user": "ann"}).encode() if method == "POST" else None
        bearer = {"Authorization": b"Bearer " + as_header(given)} if given else {}
        cookie = {"Cookie": f"{SESSION_COOKIE}=".encode() + as_header(given)} if given else {}
        # No X-Browservm header with the cookie: a change by cookie needs it, a read does not.
        return [await request(client, method, url, headers=bearer, content=content),
                await request(client, method, url, headers=cookie, content=content)]

    responses = server_run(server, scenario)
    for response in responses:
        assert response.status_code < 500, (credential, response.status_code, response.text[:300])
        assert response.status_code == want, (credential, response.status_code, response.text[:300])
        if want == 401 and kind == "operator":
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["type"], response.text
        if kind == "operator-page":
            assert response.headers["location"] == "/login"
        if kind == "login-form":
            assert response.headers["location"] == "/login?failed=true"
            assert SESSION_COOKIE not in response.headers.get("set-cookie", "")


def server_run(served: Served, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """`scenario` with a client that carries no key of its own: the table's credential is the only one."""
    async def main() -> T:
        async with served.client(headers={}) as client:
            return await scenario(client)

    return asyncio.run(main())


def test_the_right_key_is_let_through_where_the_wrong_ones_were_not(served: tuple[Served, dict[str, str]]) -> None:
    """The other side of the table: the same requests with the operator's key are not refused (reads
    only: a create or delete would change what the table's requests find)."""
    server, _ = served

    async def scenario(client: httpx.AsyncClient) -> list[tuple[str, int]]:
        answers = []
        for (method, path), kind in sorted(ROUTES.items()):
            if kind != "operator" or method != "GET" or path.endswith("/events") or path == "/v1/doctor":
                continue
            answer = await client.get(url_of(path), headers={"Authorization": f"Bearer {KEY}"})
            answers.append((path, answer.status_code))
        page = await client.get("/", headers={"Authorization": f"Bearer {KEY}"})
        answers.append(("/", page.status_code))
        form = await client.post("/login", content=f"key={KEY}".encode(),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert form.headers["location"] == "/" and SESSION_COOKIE in form.headers["set-cookie"]
        return answers

    answers = server_run(server, scenario)
    assert all(status not in (401, 403) and status < 500 for _, status in answers), answers
