"""The controller's client of the guest's OAuth agent (DESIGN.md, "The OAuth agent's contract").

HTTP/1.1 and JSON over one TCP connection per request, opened in the VM network's namespace by
`connect_socket` (as the readiness probes reach :6080), to the VM's address, port 7000, with
`Authorization: Bearer <secrets.agent>` from the VM's config disk.

The guest is hostile. So every answer is bounded before it is kept (the status line and headers,
the body by Content-Length or by reading to the end, each with a cap), every request has a deadline,
and every body is validated as a shape (pydantic) before anything reads a field of it. A failure is
an AgentError naming its hop:

    agent.connect   no TCP connection to the agent (net.tcp's reason)
    agent.auth      the agent refused the key (401): it is not this VM's agent
    agent.protocol  an answer that is not the contract's: malformed, too large, too slow, wrong shape
    agent.login     the agent refused to start the login
    agent.handover  the credentials could not be handed over, or do not hash to what the agent says
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from browservm.guest.credentials import credentials_digest
from browservm.oauth.errors import AgentError
from browservm.vm.guest_http import GuestEndpoint, GuestHttp

AGENT_PORT = 7000
CONNECT = "agent.connect"
AUTH = "agent.auth"
PROTOCOL = "agent.protocol"
LOGIN = "agent.login"
HANDOVER = "agent.handover"

MAX_BODY = 256 * 1024  # any answer but the handover's
MAX_HANDOVER = 16 * (4 * 1024 * 1024 // 3 + 4) + 64 * 1024  # 16 files of 1 MiB, base64, and the JSON around
_THREAD_JSON = 256 * 1024  # bodies larger than this are parsed in a thread
ModelT = TypeVar("ModelT", bound=BaseModel)


def _agent_error(kind: str, reason: str) -> AgentError:
    return AgentError({"connect": CONNECT, "auth": AUTH}.get(kind, PROTOCOL), reason)


@dataclass(frozen=True)
class AgentEndpoint(GuestEndpoint):
    port: int = AGENT_PORT


class AgentStatus(BaseModel):
    """GET /v1/status, as far as the controller reads it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    state: Literal["idle", "starting", "waiting-for-user", "captured", "failed", "timed-out", "cancelled"]
    provider: StrictStr | None = Field(None, max_length=64)
    auth_url_host: StrictStr | None = Field(None, max_length=300)
    exit_status: StrictInt | None = None
    output: list[StrictStr] = Field(default_factory=list, max_length=200)
    reason: StrictStr | None = Field(None, max_length=8192)


class _Handover(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    files: dict[StrictStr, StrictStr] = Field(max_length=16)
    sha256: StrictStr = Field(pattern=r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Handover:
    files: dict[str, bytes]
    sha256: str


class AgentClient:
    def __init__(self, endpoint: AgentEndpoint, token: str, timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self._http = GuestHttp(endpoint, token, timeout, _agent_error,
                               "the agent refused this VM's key (401): it is not this VM's agent, or the VM's "
                               "config disk is not the one it booted with")

    @property
    def timeout(self) -> float:
        return self._http.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._http.timeout = seconds

    async def status(self) -> AgentStatus:
        status, body = await self._request("GET", "/v1/status")
        if status != 200:
            raise AgentError(PROTOCOL, f"GET /v1/status answered {status}")
        return _shape(AgentStatus, body, "GET /v1/status")

    async def login(self, request: dict[str, Any]) -> None:
        status, body = await self._request("POST", "/v1/login", request)
        if status == 409:
            raise AgentError(LOGIN, "a login is already running in this VM")
        if status != 202:
            said = body.get("error") if isinstance(body, dict) else None
            raise AgentError(LOGIN, f"POST /v1/login answered {status}"
                                    + (f": {str(said)[:300]}" if said else ""))

    async def handover(self, expected: list[str]) -> Handover:
        """The credentials files, exactly `expected` paths, hashing to what the agent says."""
        status, body = await self._request("POST", "/v1/handover", {}, limit=MAX_HANDOVER)
        if status == 410:
            raise AgentError(HANDOVER, "the agent handed the credentials over already (410): to someone else?")
        if status != 200:
            raise AgentError(HANDOVER, f"POST /v1/handover answered {status}")
        answer = _shape(_Handover, body, "POST /v1/handover")
        if set(answer.files) != set(expected):
            raise AgentError(HANDOVER, f"the agent handed over {len(answer.files)} file(s), not the provider's "
                                       f"{len(expected)} credentials file(s)")
        try:
            files = {path: base64.b64decode(data, validate=True) for path, data in answer.files.items()}
        except (binascii.Error, ValueError):
            raise AgentError(HANDOVER, "a file is not valid base64") from None
        if credentials_digest(files) != answer.sha256:
            raise AgentError(HANDOVER, "the files do not hash to the sha256 the agent sent")
        return Handover(files, answer.sha256)

    async def cancel(self) -> str:
        """Ask the agent to stop the tool; the state it reports (409 if nothing ran: its state)."""
        status, body = await self._request("POST", "/v1/cancel", {}, timeout=max(self.timeout, 10.0))
        if status not in (200, 409):
            raise AgentError(PROTOCOL, f"POST /v1/cancel answered {status}")
        state = body.get("state") if isinstance(body, dict) else None
        return str(state)[:32] if isinstance(state, str) else "?"

    # --- one request ------------------------------------------------------------------------

    async def _request(self, method: str, path: str, body: object = None, *, limit: int = MAX_BODY,
                       timeout: float | None = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        status, payload = await self._http.request(method, path, data, limit=limit, timeout=timeout)
        if not payload:
            return status, None
        try:
            parsed = json.loads(payload) if len(payload) <= _THREAD_JSON else \
                await asyncio.to_thread(json.loads, payload)
        except ValueError:
            raise AgentError(PROTOCOL, f"{method} {path} answered {status} with a body that is not JSON") from None
        return status, parsed


def _shape(model: type[ModelT], body: Any, what: str) -> ModelT:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "body"
        # The message names the field and what is wrong, never the value: the guest wrote it.
        raise AgentError(PROTOCOL, f"{what} answered a body of the wrong shape: {field}: {first['msg']}") from None
