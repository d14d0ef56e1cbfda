"""Idempotency-Key on every POST: the same request under the same key (from the same caller) is done once,
and a replay gets the first answer, with `Idempotent-Replayed: true`.

    same key, same request, first one finished    its answer again (stored for `KEEP_S`)
    same key, same request, first one running      waits for it, then its answer
    same key, another request                      409 naming the header: a key is for one request
    first one cut off by a restart of the server   409: what it did is unknown; nothing is done twice
    first one answered 429 or 5xx                  not kept: a retry runs anew, as the client would want

Scoped by the caller's credential (its digest: a key is never stored) so one client's key never returns
another's answer. An answer that carries a secret shown once (a new API key) is not kept: the route
says so (`no_replay`), and a replay is told what was made instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from browservm.access.principal import Principal
from browservm.store import Store

HEADER = "idempotency-key"
KEEP_S = 24 * 3600
MAX_KEPT_BODY = 256 * 1024
_OWNER = f"{os.getpid()}:{time.time()}"  # this process: a row it left running ended with it


PARAMETER = {"name": "Idempotency-Key", "in": "header", "required": False,
             "description": "done once per key: a replay gets the first answer (Idempotent-Replayed: true), also "
                            "while the first still runs; kept 24 h", "schema": {"type": "string", "minLength": 1,
                                                                               "maxLength": 255,
                                                                               "pattern": "^[\\x21-\\x7e]+$"}}


def document(openapi: dict[str, Any]) -> dict[str, Any]:
    """The header on every POST of the API, in its OpenAPI document (the middleware is no route of its own)."""
    for path, operations in openapi.get("paths", {}).items():
        post = operations.get("post")
        if path.startswith("/v1/") and post is not None:
            post.setdefault("parameters", []).append(PARAMETER)
    return openapi


def no_replay(request: Request, why: str) -> None:
    """This answer must not be kept (a secret shown once): a replay is told `why` instead (409)."""
    request.state.no_replay = why


@dataclass(frozen=True)
class Kept:
    fingerprint: str
    state: str
    owner: str
    status: int | None
    body: bytes | None


class IdempotencyRecords:
    """The `idempotency` table. Blocking (SQLite): run in a thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def begin(self, row_id: str, fingerprint: str) -> Kept | None:
        """Claim `row_id` for this process (None), or what is kept under it already."""
        with self._store.transaction() as db:
            db.execute("DELETE FROM idempotency WHERE created_at < ?", (time.time() - KEEP_S,))
            found = db.execute("SELECT fingerprint, state, owner, status, body FROM idempotency WHERE id = ?",
                               (row_id,)).fetchone()
            if found is not None:
                return Kept(str(found[0]), str(found[1]), str(found[2]), found[3], found[4])
            db.execute("INSERT INTO idempotency (id, fingerprint, state, owner, created_at) "
                       "VALUES (?, ?, 'running', ?, ?)", (row_id, fingerprint, _OWNER, time.time()))
        return None

    def finish(self, row_id: str, status: int, body: bytes) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE idempotency SET state = 'done', status = ?, body = ? WHERE id = ?",
                       (status, body, row_id))

    def forget(self, row_id: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM idempotency WHERE id = ?", (row_id,))


def _error(status: int, kind: str, message: str, **fields: str) -> tuple[int, bytes]:
    return status, json.dumps({"error": {"type": kind, "message": message, **fields}}).encode()


class Idempotent:
    """ASGI middleware (inside BodyLimit: the body it reads is bounded)."""

    def __init__(self, app: ASGIApp, records: IdempotencyRecords) -> None:
        self.app = app
        self.records = records
        self._running: dict[str, asyncio.Event] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", ()))
        key = headers.get(HEADER.encode())
        if scope["type"] != "http" or scope.get("method") != "POST" or key is None \
                or not scope.get("path", "").startswith("/v1/"):  # the API's: the sign-in form is no API
            await self.app(scope, receive, send)
            return
        if not 1 <= len(key) <= 255 or not all(0x21 <= byte <= 0x7e for byte in key):
            await _answer(send, *_error(422, "InvalidInput", "Idempotency-Key: must be 1-255 visible ASCII "
                                        "characters", field="Idempotency-Key"))
            return
        body, more = await _read_body(receive)
        credential = headers.get(b"authorization", b"") + b"\n" + headers.get(b"cookie", b"")
        row_id = hashlib.sha256(b"browservm idempotency\n" + credential + b"\n" + key).hexdigest()
        fingerprint = hashlib.sha256(b"\n".join((scope["path"].encode(), scope.get("query_string", b""),
                                                 body))).hexdigest()
        while (running := self._running.get(row_id)) is not None:
            await running.wait()  # the first request with this key, in this process: its answer is ours
        kept = await asyncio.to_thread(self.records.begin, row_id, fingerprint)
        if kept is not None:
            await _answer(send, *self._replay(kept, fingerprint), replayed=kept.state == "done")
            return
        self._running[row_id] = done = asyncio.Event()
        try:
            await self._first(scope, (body, more, receive), send, row_id)
        finally:
            del self._running[row_id]
            done.set()

    @staticmethod
    def _replay(kept: Kept, fingerprint: str) -> tuple[int, bytes]:
        if kept.fingerprint != fingerprint:
            return _error(409, "IdempotencyKeyReused", "Idempotency-Key: already used for another request (a key is "
                          "for one request: the same method, path, query and body)", field="Idempotency-Key")
        if kept.state != "done" or kept.status is None or kept.body is None:
            return _error(409, "IdempotentRequestCutOff", "the first request with this Idempotency-Key was cut off "
                          "by a restart of the controller: what it did is unknown (look for it, e.g. by label), "
                          "and it is not done again")
        return kept.status, kept.body

    async def _first(self, scope: Scope, request: tuple[bytes, list[Message], Receive], send: Send,
                     row_id: str) -> None:
        """Run the request, and keep its answer for replays unless it must not be kept."""
        body, more, receive = request
        pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}, *more]
        status, kept_size = 500, 0
        chunks: list[bytes] = []

        async def replay_receive() -> Message:
            return pending.pop(0) if pending else await receive()

        async def keeping_send(message: Message) -> None:
            nonlocal status, kept_size
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {**message, "headers": [*message.get("headers", []), (b"idempotent-replayed", b"false")]}
            elif message["type"] == "http.response.body":
                kept_size += len(message.get("body", b""))
                if kept_size <= MAX_KEPT_BODY:
                    chunks.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, replay_receive, keeping_send)
        except BaseException:
            await asyncio.shield(asyncio.to_thread(self.records.forget, row_id))
            raise
        state = scope.get("state", {})
        if not isinstance(state.get("principal"), Principal) or status == 429 or status >= 500 \
                or kept_size > MAX_KEPT_BODY:
            # Refused before the caller was known, or not done for a reason a retry may not meet: not kept.
            await asyncio.to_thread(self.records.forget, row_id)
            return
        why = state.get("no_replay")
        answer = _error(409, "NotReplayed", why) if isinstance(why, str) else (status, b"".join(chunks))
        await asyncio.to_thread(self.records.finish, row_id, *answer)


async def _read_body(receive: Receive) -> tuple[bytes, list[Message]]:
    """The request's body (BodyLimit, outside, bounds it), and a disconnect read on the way."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), [message]
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), []


async def _answer(send: Send, status: int, body: bytes, *, replayed: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"idempotent-replayed", b"true" if replayed else b"false")]})
    await send({"type": "http.response.body", "body": body})
