"""A client of the guest agent's API (DESIGN.md, "The OAuth agent's contract"), for tests on both sides.

`AgentClient` speaks to an agent at host:port: in-process on loopback in unit tests, or in a booted
VM through a socket opened in the VM network's namespace (`netns=`), the way the controller reaches
it. `drive_login` runs a whole login over it: POST /v1/login, wait for a state, hand over.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from browservm.guest.credentials import credentials_digest
from browservm.hostnet.netns import NetworkNamespace

FINAL_STATES = ("captured", "failed", "timed-out", "cancelled")


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any


class _NamespacedConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is made inside a network namespace (then used from anywhere)."""

    def __init__(self, host: str, port: int, netns: NetworkNamespace | None, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._netns = netns

    def connect(self) -> None:
        if self._netns is None:
            super().connect()
            return
        with self._netns.entered():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class AgentClient:
    def __init__(self, host: str, port: int, secret: str | None, netns: NetworkNamespace | None = None,
                 timeout: float = 30.0) -> None:
        self.host, self.port, self.secret, self.netns, self.timeout = host, port, secret, netns, timeout

    def request(self, method: str, path: str, body: Any = None, secret: str | None = "default",
                raw: bytes | None = None) -> Answer:
        connection = _NamespacedConnection(self.host, self.port, self.netns, self.timeout)
        headers = {"Content-Type": "application/json"}
        token = self.secret if secret == "default" else secret
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        finally:
            connection.close()
        return Answer(response.status, json.loads(payload) if payload else None)

    def status(self) -> dict[str, Any]:
        answer = self.request("GET", "/v1/status")
        assert answer.status == 200, answer
        body: dict[str, Any] = answer.body
        return body

    def wait_for(self, states: Iterable[str], timeout: float) -> dict[str, Any]:
        """Ask until the state is one of `states` (or a final one); the agent has no event stream to await."""
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] in wanted or status["state"] in FINAL_STATES:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"state still {status['state']} after {timeout:g} s: {status}")
            time.sleep(0.1)


@dataclass(frozen=True)
class LoginResult:
    status: dict[str, Any]
    files: dict[str, bytes]
    sha256: str | None


def drive_login(client: AgentClient, login: dict[str, Any], timeout: float) -> LoginResult:
    """POST /v1/login, wait for a final state, and hand over (when captured); checks the digest it returns."""
    answer = client.request("POST", "/v1/login", login)
    assert answer.status == 202, answer
    status = client.wait_for(FINAL_STATES, timeout)
    if status["state"] != "captured":
        return LoginResult(status, {}, None)
    handover = client.request("POST", "/v1/handover")
    assert handover.status == 200, handover
    files = {path: base64.b64decode(data) for path, data in handover.body["files"].items()}
    assert handover.body["sha256"] == credentials_digest(files)
    return LoginResult(status, files, handover.body["sha256"])


def sample_login(issuer: str, credentials: str = "/home/browser/.sample/credentials.json", port: int = 0,
                 timeout_s: float = 120) -> dict[str, Any]:
    """The `sample` provider's login request, as the host's catalog would send it for the image's tool."""
    return {"provider": "sample",
            "command": ["/usr/lib/browservm/bin/browservm-sample-login", "--issuer", issuer,
                        "--credentials", credentials, "--port", str(port)],
            "env": {}, "credentials": [credentials], "required_keys": ["access_token", "refresh_token"],
            "timeout_s": timeout_s}
