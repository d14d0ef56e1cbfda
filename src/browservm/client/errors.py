"""What the client raises: the controller's error body as typed exceptions, and its own failures.

    ClientError (BrowserVMError)
    ├── ControllerError          the controller answered 4xx/5xx: `status`, `type`, `message`, `field` ("" if
    │   │                        none), `limit`, `state` (None if none), and `body` (its error object as sent)
    │   ├── InvalidRequest       422 (also an InvalidInput): `field` names what was refused
    │   ├── KeyRefused           401: the API key is not the controller's
    │   ├── NotFound             404
    │   ├── Conflict             409 (`state`: e.g. "running" for a login already under way)
    │   ├── LimitReached         429: `limit` names the limit
    │   ├── Unavailable          503
    │   └── NotAController       an answer without the API's JSON: something else listens at the URL
    ├── ControllerUnreachable    no answer at the URL (refused, timed out, reset): `url`, `detail`
    │   └── UntrustedCertificate https: its certificate does not verify against the CAs trusted (`ca_file`)
    ├── StreamQuiet              no byte on an event stream for as long as the client waits (`events_quiet`)
    ├── StreamEnded              the controller ended an event stream before the end was told
    ├── WaitTimedOut             wait_vm / wait_login's own deadline passed: `what`, `id`, `timeout`, `state`
    ├── VmFailed                 wait_vm: the VM failed, ended or was deleted: `vm_id`, `state`, `hop`, `reason`
    └── LoginFailed              wait_login: failed, timed-out or cancelled: `login_id`, `state`, `hop`, `reason`

The mapping from a response to an error is one function (`error_of`), for the sync and the async client.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from browservm.errors import BrowserVMError, InvalidInput

if TYPE_CHECKING:
    from browservm.client.models import Login, Vm


class ClientError(BrowserVMError):
    """Every error browservm.client raises on purpose."""


class ControllerError(ClientError):
    """The controller refused a request; `body` is its error object, as it sent it."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.type = str(body.get("type") or "HTTPError")
        self.message = str(body.get("message") or f"HTTP {status}")
        self.field = str(body.get("field") or "")  # "" when the controller named none
        self.limit: str | None = _text(body.get("limit"))
        self.state: str | None = _text(body.get("state"))
        # Not super(): in InvalidRequest the next class is InvalidInput, which wants other arguments.
        BrowserVMError.__init__(self, self.message)


class InvalidRequest(ControllerError, InvalidInput):
    """A 422: the controller named a bad field. An InvalidInput, as the same mistake made locally is."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        ControllerError.__init__(self, status, body)
        self.value = None
        self.reason = self.message


class KeyRefused(ControllerError):
    """A 401: the API key given to the client is not one the controller takes."""


class NotFound(ControllerError):
    pass


class Conflict(ControllerError):
    pass


class LimitReached(ControllerError):
    """A 429: `limit` names the limit the request would pass."""


class Unavailable(ControllerError):
    pass


class NotAController(ControllerError):
    """An answer that is not the API's JSON: something else listens at the URL (or in front of it)."""


_BY_STATUS: dict[int, type[ControllerError]] = {
    401: KeyRefused, 404: NotFound, 409: Conflict, 422: InvalidRequest, 429: LimitReached, 503: Unavailable}


class ControllerUnreachable(ClientError):
    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"no controller answers at {url}: is `browservm serve` running?"
                         + (f" ({detail})" if detail else ""))


class UntrustedCertificate(ControllerUnreachable):
    """https: the controller's certificate does not verify against the CAs this client trusts."""

    def __init__(self, url: str, reason: str) -> None:
        ClientError.__init__(self, f"the certificate of {url} is not trusted ({reason}): give the CA that signed it, "
                                   "or the certificate itself, as ca_file (the CLI's --ca-file or BROWSERVM_CA_FILE)")
        self.url = url
        self.detail = reason


class StreamQuiet(ClientError):
    def __init__(self, url: str, path: str, seconds: float) -> None:
        self.url = url
        self.path = path
        self.seconds = seconds
        super().__init__(f"no event from {url}{path} for {seconds:g} s")


class StreamEnded(ClientError):
    """The controller ended an event stream while what it told of was not settled (it stops, most likely)."""

    def __init__(self, url: str, what: str, ident: str, state: str) -> None:
        self.url = url
        self.what = what
        self.id = ident
        self.state = state
        super().__init__(f"the controller at {url} ended the event stream while {what} {ident} was {state}")


class WaitTimedOut(ClientError):
    def __init__(self, what: str, ident: str, timeout: float, state: str) -> None:
        self.what = what
        self.id = ident
        self.timeout = timeout
        self.state = state
        super().__init__(f"{what} {ident} was still {state} after {timeout:g} s")


class VmFailed(ClientError):
    """wait_vm: the VM did not become ready. `vm` is its record (None when it was deleted meanwhile)."""

    def __init__(self, vm_id: str, state: str, hop: str | None, reason: str, vm: Vm | None = None) -> None:
        self.vm_id = vm_id
        self.state = state
        self.hop = hop
        self.reason = reason
        self.vm = vm
        where = f" at {hop}" if hop else ""
        super().__init__(f"VM {vm_id} {state}{where}: {reason}" if reason else f"VM {vm_id} {state}{where}")


class LoginFailed(ClientError):
    """wait_login: the login ended without credentials. `login` is its record."""

    def __init__(self, login: Login) -> None:
        self.login = login
        self.login_id = login.login_id
        self.state = login.state
        self.hop = login.hop
        self.reason = login.reason or ""
        told = f"login {login.login_id} {login.state}" + (f" at {login.hop}" if login.hop else "")
        super().__init__(f"{told}: {self.reason}" if self.reason else told)


def error_of(status: int, payload: object, answered: str, base_url: str) -> ControllerError:
    """The error a 4xx/5xx answer means. `payload` is its decoded JSON (None when it was not JSON);
    `answered` says what was asked and answered ("GET http://.../v1/vms answered 502 Bad Gateway")."""
    body = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(body, dict) or not isinstance(body.get("message"), str):
        return not_a_controller(status, answered, base_url)
    return _BY_STATUS.get(status, ControllerError)(status, body)


def not_a_controller(status: int, answered: str, base_url: str) -> NotAController:
    return NotAController(status, {"type": "HTTPError", "message": f"{answered} without the API's JSON: is {base_url} "
                                                                   "a browservm controller?"})


def _text(value: object) -> str | None:
    return None if value is None else str(value)
