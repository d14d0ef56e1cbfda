"""One HTTP/1.1 request from the controller to a service in a guest (the OAuth agent, the profile keeper).

A TCP connection per request, opened in the VM network's namespace by `connect_socket` (as the readiness
probes reach the desktop), to the VM's address, with `Authorization: Bearer <secrets.agent>` from the VM's
config disk; `Connection: close`.

The guest is hostile. So every answer is bounded before it is kept (the status line and headers, the
body by Content-Length or by reading to the end, each with a cap), every request has a deadline, and a
failure is raised as the caller's error type, told which kind it is:

    connect   no TCP connection (net.tcp's reason)
    auth      the service refused the VM's key (401)
    protocol  an answer that is not HTTP as the contract has it: malformed, too large, too slow
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from browservm.errors import ProbeFailed
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.readiness import connect_socket

MAX_HEAD = 16 * 1024  # status line and headers
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})(?: [^\r\n]*)?")
ErrorOf = Callable[[str, str], Exception]  # (kind: connect, auth or protocol; reason) -> the caller's error


@dataclass(frozen=True)
class GuestEndpoint:
    netns: NetworkNamespace
    address: IPv4Address
    port: int


class GuestHttp:
    def __init__(self, endpoint: GuestEndpoint, token: str, timeout: float, error: ErrorOf,
                 refused: str) -> None:
        """`error` makes the caller's exception of a failure's kind and reason; `refused` is what a 401 means."""
        self.endpoint = endpoint
        self._token = token
        self.timeout = timeout
        self._error = error
        self._refused = refused

    async def request(self, method: str, path: str, body: bytes | None = None, *, limit: int,
                      timeout: float | None = None, headers: Mapping[str, str] | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        """The answer's status and body (at most `limit` bytes), within `timeout` (default: the client's)."""
        endpoint = self.endpoint
        try:
            sock = await connect_socket(endpoint.netns, endpoint.address, endpoint.port, self.timeout)
        except ProbeFailed as exc:
            raise self._error("connect", exc.reason) from None
        try:
            async with asyncio.timeout(timeout or self.timeout):
                head = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
                if body is not None:
                    head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                return await self._exchange(sock, f"{method} {path}", head, body or b"", limit)
        except TimeoutError:
            raise self._error("protocol", f"{method} {path}: no complete answer within {timeout or self.timeout:g} s"
                              ) from None
        except (ConnectionError, OSError) as exc:
            raise self._error("protocol", f"{method} {path}: the connection broke ({exc.strerror or exc})") from None

    async def _exchange(self, sock: Any, request: str, head: str, body: bytes, limit: int) -> tuple[int, bytes]:
        """`request` is "METHOD PATH"; `head` the request's own header lines."""
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_HEAD)
        method, path = request.split(" ", 1)
        try:
            writer.write(f"{request} HTTP/1.1\r\nHost: {self.endpoint.address}:{self.endpoint.port}\r\n"
                         f"Authorization: Bearer {self._token}\r\nConnection: close\r\n{head}\r\n".encode())
            if body:
                writer.write(body)
            await writer.drain()
            status, length = await self._read_head(reader, method, path)
            if status == 401:
                raise self._error("auth", self._refused)
            return status, await self._read_body(reader, length, limit, method, path)
        finally:
            writer.close()

    async def _read_head(self, reader: asyncio.StreamReader, method: str, path: str) -> tuple[int, int | None]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise self._error("protocol", f"{method} {path}: the answer's headers are over {MAX_HEAD} bytes") from None
        except asyncio.IncompleteReadError:
            raise self._error("protocol", f"{method} {path}: the connection closed before a complete answer") from None
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            raise self._error("protocol", f"{method} {path}: the answer does not start with an HTTP status line")
        length: int | None = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                if not value.strip().isdigit():
                    raise self._error("protocol", f"{method} {path}: a Content-Length that is not a number")
                length = int(value.strip())
            elif name == b"transfer-encoding":
                raise self._error("protocol", f"{method} {path}: a Transfer-Encoding answer (the guest's services "
                                              "send Content-Length)")
        return int(match.group(1)), length

    async def _read_body(self, reader: asyncio.StreamReader, length: int | None, limit: int, method: str,
                         path: str) -> bytes:
        if length is not None and length > limit:
            raise self._error("protocol", f"{method} {path}: a body of {length} bytes, over the {limit} this answer "
                                          "may have")
        try:
            if length is not None:
                return await reader.readexactly(length)
            payload = await reader.read(limit + 1)  # no length: to the end (Connection: close), bounded
            while len(payload) <= limit and (more := await reader.read(limit + 1 - len(payload))):
                payload += more
        except asyncio.IncompleteReadError:
            raise self._error("protocol", f"{method} {path}: the connection closed in the middle of the body") from None
        if len(payload) > limit:
            raise self._error("protocol", f"{method} {path}: a body over the {limit} bytes this answer may have")
        return payload
