"""A real OAuth 2.0 authorization server for the tests: authorization code + PKCE S256, loopback redirects.

The protocol is authlib's (`authlib.oauth2.rfc6749.AuthorizationServer`, `AuthorizationCodeGrant`,
`rfc7636.CodeChallenge(required=True)`); this module only connects it to `http.server` and keeps
its records in memory. One public client (`client_id`, no secret: token endpoint auth `none`) whose
registered redirect is `http://127.0.0.1/callback` with any port, as RFC 8252 section 7.3 says for
loopback IP redirects. Every token response carries the server's known `access_token` and
`refresh_token`, so a test can compare what the host finally holds with what was issued.

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata (the sample tool reads it)
    GET  /authorize                                the consent page: one "Approve" button, focused
    POST /authorize                                approve=1 -> 302 to the redirect with code and state
    POST /token                                    the code and its PKCE verifier -> the known tokens

`approve="auto"` answers GET /authorize with the redirect at once (a browser follows it with no
person), for tests of everything but the person's click.

Like a real provider, it remembers the person's sign-in in the browser: the first GET /authorize a
browser makes sets a cookie (SESSION_COOKIE, 30 days), and each later one from that browser carries it.
`record.sessions_seen` says, per GET /authorize, which session the browser came with (None: not
signed in); `record.sessions_issued` the sessions it was given. The server runs on a socket the caller
opens (inside a test's network namespace: `listen(..., netns=...)`), on a thread of its own.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from html import escape
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

# The server speaks plain HTTP on a test network (a loopback or a namespace's gateway), never beyond.
os.environ.setdefault("AUTHLIB_INSECURE_TRANSPORT", "1")

from authlib.oauth2.rfc6749 import (  # type: ignore[import-untyped]
    AuthorizationServer,
    ClientMixin,
    OAuth2Error,
    OAuth2Request,
    grants,
)
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload  # type: ignore[import-untyped]
from authlib.oauth2.rfc7636 import CodeChallenge  # type: ignore[import-untyped]

from browservm.hostnet.netns import NetworkNamespace

CLIENT_ID = "browservm-sample"
SESSION_COOKIE = "test_provider_session"
REDIRECT_PATH = "/callback"


@dataclass(frozen=True)
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str:
        return f"http://127.0.0.1{REDIRECT_PATH}"

    def get_allowed_scope(self, scope: str) -> str:
        return scope

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        """RFC 8252 7.3: a loopback IP literal with any port, over http, on the registered path."""
        parts = urlsplit(redirect_uri)
        return (parts.scheme == "http" and parts.hostname == "127.0.0.1" and parts.path == REDIRECT_PATH
                and not parts.query and not parts.fragment)

    def check_client_secret(self, client_secret: str) -> bool:
        return False  # a public client has none

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == "none"

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in ("authorization_code", "refresh_token")  # the latter: a refresh token is issued


@dataclass
class AuthorizationCode:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    code_challenge: str | None
    code_challenge_method: str | None
    issued: float = field(default_factory=time.monotonic)

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope

    def is_expired(self) -> bool:
        return time.monotonic() - self.issued > 600  # RFC 6749 4.1.2: ten minutes at most


class _Request(OAuth2Request):  # type: ignore[misc]
    def __init__(self, method: str, uri: str, query: dict[str, str], form: dict[str, str],
                 headers: dict[str, str]) -> None:
        super().__init__(method, uri, headers=headers)
        self._args, self._form = query, form
        self.payload = BasicOAuth2Payload({**query, **form})

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


@dataclass(frozen=True)
class Response:
    status: int
    body: str
    headers: list[tuple[str, str]]


@dataclass
class Record:
    """What happened, for the tests' assertions."""

    consent_pages: int = 0
    codes_issued: list[str] = field(default_factory=list)
    tokens_issued: int = 0
    token_errors: list[str] = field(default_factory=list)
    challenges: list[str] = field(default_factory=list)
    sessions_seen: list[str | None] = field(default_factory=list)
    sessions_issued: list[str] = field(default_factory=list)


class TestAuthorizationServer(AuthorizationServer):  # type: ignore[misc]
    __test__ = False  # not a pytest class

    def __init__(self, issuer: str, access_token: str | None = None, refresh_token: str | None = None,
                 client_id: str = CLIENT_ID, approve: str = "button") -> None:
        super().__init__(scopes_supported=None)
        self.issuer = issuer.rstrip("/")
        self.access_token = access_token or "at-" + secrets.token_urlsafe(24)
        self.refresh_token = refresh_token or "rt-" + secrets.token_urlsafe(24)
        self.approve = approve
        self.client = Client(client_id)
        self.codes: dict[str, AuthorizationCode] = {}
        self.record = Record()
        self.token_issued = threading.Event()
        self._lock = threading.Lock()
        self.register_token_generator("default", self._generate_token)
        self.register_grant(_CodeGrant, [CodeChallenge(required=True)])

    # --- authlib's framework hooks ------------------------------------------------------------

    def query_client(self, client_id: str) -> Client | None:
        return self.client if client_id == self.client.client_id else None

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        with self._lock:
            self.record.tokens_issued += 1
        self.token_issued.set()

    def create_oauth2_request(self, request: _Request) -> _Request:
        return request

    def create_json_request(self, request: Any) -> Any:
        raise NotImplementedError("no JSON endpoints here")

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        text = body if isinstance(body, str) else json.dumps(body)
        return Response(status, text, [(str(k), str(v)) for k, v in (headers or [])])

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def _generate_token(self, grant_type: str, client: Client, user: Any = None, scope: str | None = None,
                        expires_in: int | None = None, include_refresh_token: bool = True) -> dict[str, Any]:
        token: dict[str, Any] = {"token_type": "Bearer", "access_token": self.access_token, "expires_in": 3600}
        if include_refresh_token:
            token["refresh_token"] = self.refresh_token
        if scope:
            token["scope"] = scope
        return token

    # --- the endpoints ------------------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {"issuer": self.issuer, "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token", "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code"], "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["none"]}

    def authorize_page(self, request: _Request) -> Response:
        response = self._authorize_page(request)
        cookies = dict(part.strip().partition("=")[::2] for part in request.headers.get("Cookie", "").split(";")
                       if "=" in part)
        with self._lock:
            session = cookies.get(SESSION_COOKIE)
            known = session if session in self.record.sessions_issued else None
            self.record.sessions_seen.append(known)
            if known is not None:
                return response
            session = "ps-" + secrets.token_urlsafe(18)
            self.record.sessions_issued.append(session)
        cookie = f"{SESSION_COOKIE}={session}; Max-Age=2592000; Path=/; HttpOnly; SameSite=Lax"
        return Response(response.status, response.body, [*response.headers, ("Set-Cookie", cookie)])

    def _authorize_page(self, request: _Request) -> Response:
        try:
            grant = self.get_consent_grant(request, end_user="person")
        except OAuth2Error as error:
            return self.handle_error_response(request, error)  # type: ignore[no-any-return]
        if self.approve == "auto":
            return self.create_authorization_response(request, grant_user="person",  # type: ignore[no-any-return]
                                                      grant=grant)
        with self._lock:
            self.record.consent_pages += 1
        hidden = "".join(f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
                         for k, v in request.args.items())
        page = ("<!doctype html><html><head><meta charset=utf-8><title>Sign in to the test provider</title>"
                "<style>body{font:20px sans-serif;margin:3em}button{font-size:28px;padding:.4em 2em}</style></head>"
                f"<body><h1>Approve access?</h1><p>{escape(self.client.client_id)} asks for "
                f"<b>{escape(request.args.get('scope', ''))}</b>.</p>"
                f'<form method="post" action="/authorize">{hidden}'
                '<button type="submit" name="approve" value="1" id="approve" autofocus>Approve</button>'
                "</form><script>document.getElementById('approve').focus()</script></body></html>")
        return Response(200, page, [("Content-Type", "text/html; charset=utf-8")])

    def authorize_decision(self, request: _Request) -> Response:
        try:
            grant = self.get_consent_grant(request, end_user="person")
        except OAuth2Error as error:
            return self.handle_error_response(request, error)  # type: ignore[no-any-return]
        user = "person" if request.form.get("approve") == "1" else None
        return self.create_authorization_response(request, grant_user=user, grant=grant)  # type: ignore[no-any-return]

    def token(self, request: _Request) -> Response:
        response: Response = self.create_token_response(request)
        if response.status != 200:
            with self._lock:
                self.record.token_errors.append(response.body)
        return response


class _CodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["none"]  # noqa: RUF012 - authlib's class attribute
    server: TestAuthorizationServer

    def save_authorization_code(self, code: str, request: _Request) -> None:
        data = request.payload.data
        record = AuthorizationCode(code, request.client.client_id, data.get("redirect_uri", ""),
                                   data.get("scope", ""), data.get("code_challenge"),
                                   data.get("code_challenge_method"))
        with self.server._lock:
            self.server.codes[code] = record
            self.server.record.codes_issued.append(code)
            self.server.record.challenges.append(record.code_challenge or "")

    def query_authorization_code(self, code: str, client: Client) -> AuthorizationCode | None:
        with self.server._lock:
            found = self.server.codes.get(code)
        if found is None or found.client_id != client.client_id or found.is_expired():
            return None
        return found

    def delete_authorization_code(self, authorization_code: AuthorizationCode) -> None:
        with self.server._lock:
            self.server.codes.pop(authorization_code.code, None)  # a code is used once

    def authenticate_user(self, authorization_code: AuthorizationCode) -> str:
        return "person"


class _Handler(BaseHTTPRequestHandler):
    server: _HttpServer
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _request(self, method: str) -> _Request:
        parts = urlsplit(self.path)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        form: dict[str, str] = {}
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            form = dict(parse_qsl(self.rfile.read(min(length, 65536)).decode(), keep_blank_values=True))
        uri = f"{self.server.authority.issuer}{self.path}"
        return _Request(method, uri, query, form, {k: v for k, v in self.headers.items()})

    def _send(self, response: Response) -> None:
        data = response.body.encode()
        self.send_response(response.status)
        headers = dict(response.headers)
        headers.setdefault("Content-Type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        authority = self.server.authority
        if path == "/.well-known/oauth-authorization-server":
            self._send(Response(200, json.dumps(authority.metadata()), []))
        elif path == "/authorize":
            self._send(authority.authorize_page(self._request("GET")))
        else:
            self._send(Response(404, json.dumps({"error": "not_found"}), []))

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        authority = self.server.authority
        if path == "/authorize":
            self._send(authority.authorize_decision(self._request("POST")))
        elif path == "/token":
            self._send(authority.token(self._request("POST")))
        else:
            self._send(Response(404, json.dumps({"error": "not_found"}), []))


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, listener: socket.socket, authority: TestAuthorizationServer) -> None:
        super().__init__(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.authority = authority


@contextmanager
def listen(host: str = "127.0.0.1", port: int = 0, netns: NetworkNamespace | None = None,
           **options: Any) -> Iterator[TestAuthorizationServer]:
    """Serve on host:port (inside `netns` when given) until the block ends; yields the server (its issuer)."""
    if netns is not None:
        with netns.entered():
            listener = socket.create_server((host, port))
    else:
        listener = socket.create_server((host, port))
    bound = listener.getsockname()[1]
    authority = TestAuthorizationServer(f"http://{host}:{bound}", **options)
    server = _HttpServer(listener, authority)
    thread = threading.Thread(target=server.serve_forever, name="oauth-server", daemon=True)
    thread.start()
    try:
        yield authority
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

