"""The agent's HTTP front: a small JSON server whose every request carries a key, and the routes given to it.

Requests without the key get 401 and nothing more; bodies are JSON of at most 64 KiB with a
Content-Length, or, on a raw route, bytes up to that route's own bound, answered with bytes or JSON.
The server knows nothing of logins or profiles: agent.py and profile_keeper.py give it their routes.
Stdlib-only: it runs in the guest.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import threading
from collections.abc import Callable, Mapping
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from browservm.guest import configdisk

MAX_BODY = 64 * 1024
_REQUEST_TIMEOUT_S = 10.0


class _Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    timeout = _REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the journal needs no line per request; requests carry nothing worth keeping

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _send_bytes(self, status: int, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self) -> bool:
        if self.server.key.matches(self.headers.get("Authorization", "")):
            return True
        self.close_connection = True
        self._send(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"})
        return False

    def _body(self) -> Any:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            if self.headers.get("Transfer-Encoding"):
                raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
            return None
        size = int(length)
        if size > MAX_BODY:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY} bytes")
        data = self.rfile.read(size)
        if not data:
            return None
        try:
            return json.loads(data)
        except ValueError:
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the body is not JSON") from None

    def _raw_body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or self.headers.get("Transfer-Encoding"):
            raise _HttpError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length")
        if int(length) > limit:
            raise _HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {limit} bytes")
        data = self.rfile.read(int(length))
        if len(data) != int(length):
            raise _HttpError(HTTPStatus.BAD_REQUEST, "the body ended before its Content-Length")
        return data

    def _dispatch(self, method: str) -> None:
        if not self._authorised():
            return
        answer: Mapping[str, Any] | bytes
        try:
            path = self.path.split("?", 1)[0]
            raw = self.server.raw_routes.get((method, path))
            if raw is not None:
                limit, handler = raw
                status, answer = handler(self._raw_body(limit), self.headers)
            else:
                body = self._body() if method == "POST" else None
                route = self.server.routes.get((method, path))
                if route is None:
                    raise _HttpError(HTTPStatus.NOT_FOUND, f"no {method} {self.path[:100]}")
                status, answer = route(body)
        except _HttpError as exc:
            self.close_connection = True
            status, answer = exc.status, {"error": exc.message}
        if isinstance(answer, bytes):
            self._send_bytes(status, answer)
        else:
            self._send(status, answer)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


Route = Callable[[Any], tuple[int, Mapping[str, Any]]]
# (the body's bound, the handler of the body and the request's headers)
RawRoute = tuple[int, Callable[[bytes, Message], tuple[int, "Mapping[str, Any] | bytes"]]]


class AgentKey:
    """The key a request must carry (`Authorization: Bearer <key>`).

    The host may give a running VM a new one (a restore's identity, a pooled VM's claim in
    vm/pool.py: both rewrite its config disk), so with `reread` each request is checked against the
    key on the disk, read past the page cache (one 4 KiB read): the new key works at once and the
    old one stops at once, before anyone used the new one. A disk that cannot be read keeps the
    last key read.
    """

    def __init__(self, key: str, reread: Callable[[], str] | None = None) -> None:
        self._key = key
        self._reread = reread
        self._lock = threading.Lock()

    def matches(self, authorization: str) -> bool:
        with self._lock:
            if self._reread is not None:
                with contextlib.suppress(OSError, configdisk.ConfigDiskError):
                    self._key = self._reread()
            return hmac.compare_digest(authorization.encode(), f"Bearer {self._key}".encode())


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 16

    def __init__(self, address: tuple[str, int], key: AgentKey, routes: dict[tuple[str, str], Route],
                 raw_routes: dict[tuple[str, str], RawRoute] | None = None) -> None:
        self.key = key
        self.routes = routes
        self.raw_routes = raw_routes or {}
        super().__init__(address, _Handler)


def read_secret(path: Path) -> str:
    document = configdisk.read_uncached(path)
    secret = document.get("secrets", {}).get("agent")
    if not isinstance(secret, str) or re.fullmatch(r"[0-9a-f]{64}", secret) is None:
        raise configdisk.ConfigDiskError("the config disk carries no agent secret (secrets.agent, 64 hex digits)")
    return secret
