"""What a controller (or a front) logs, and how: text for a person, or JSON, one object a line, for a log
pipeline; and an access log of every request, each with a request id that its other lines carry too.

The access log never holds a secret: no header is logged, and the query parameters that carry one
(a viewer's `token`, a `key`) are logged as "[redacted]". The request id is ours (16 hex digits),
also sent back in the `X-Request-Id` header, so a client's report names the lines to read.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import parse_qsl, urlencode

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
REQUEST_ID: ContextVar[str | None] = ContextVar("browservm_request_id", default=None)
SECRET_PARAMETERS = frozenset({"token", "key", "api_key"})
access = logging.getLogger("browservm.access")


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonLines(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, and the request id if any."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} [{request_id}]" if request_id else text


def configure(log_format: LogFormat) -> None:
    """The process's logging, to standard output, in `log_format`."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_RequestId())
    handler.setFormatter(JsonLines() if log_format == "json" else _Text("%(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    # httpx logs every request's URL at INFO: a front relaying a viewer's state would log the viewer's token.
    for chatty in ("httpx", "httpcore"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def redacted(query: str) -> str:
    """A query string as it may be logged: the values of secret parameters replaced."""
    pairs = parse_qsl(query, keep_blank_values=True)
    return urlencode([(name, "[redacted]" if name.lower() in SECRET_PARAMETERS else value) for name, value in pairs])


class AccessLog:
    """ASGI middleware: a request id for each request and WebSocket, and one access line when it ends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = secrets.token_hex(8)
        reset = REQUEST_ID.set(request_id)
        started = time.monotonic()
        status: int | str = "-"

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            elif message["type"] == "websocket.accept":
                status = 101
            elif message["type"] == "websocket.close":
                status = f"ws-close {message.get('code', 1000)}"
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            query = redacted(scope.get("query_string", b"").decode("latin-1"))
            path = scope.get("path", "") + (f"?{query}" if query else "")
            access.info("%s %s %s %.1f ms", scope.get("method", "WS"), path, status,
                        (time.monotonic() - started) * 1000)
            REQUEST_ID.reset(reset)
