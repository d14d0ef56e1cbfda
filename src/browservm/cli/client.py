"""The controller's REST API as the CLI calls it: one method per route, errors as BrowserVMErrors.

Used by `vm ... --url` (remote.py) and `login` (login.py). The API key is BROWSERVM_API_KEY, else
<state-dir>/api.key (made by the controller at its first start, never here).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx

from browservm import __version__
from browservm.api.keys import API_KEY_FILE
from browservm.cli.stream import Event, Quiet, server_sent_events
from browservm.config import Settings
from browservm.errors import BrowserVMError, InvalidInput, StateError
from browservm.ids import validate_vm_id
from browservm.secretfile import read_existing

KEY_ENV = "BROWSERVM_API_KEY"
TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Between two events of a booting VM the controller is quiet for as long as a hop takes (its own
# deadlines, up to minutes). After this long without a byte the client asks for the record and
# subscribes again, so a half-open connection cannot hang a create forever.
EVENTS_QUIET = 60.0


class ControllerError(BrowserVMError):
    """The controller refused a request; `body` is its error object, as it sent it."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        # Not super(): in InvalidRemoteInput the next class is InvalidInput, which wants other arguments.
        BrowserVMError.__init__(self, str(body.get("message") or f"HTTP {status}"))


class InvalidRemoteInput(ControllerError, InvalidInput):
    """A 422: the controller named a bad field. An InvalidInput, so the exit code is 2 as in local mode."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        ControllerError.__init__(self, status, body)
        self.field = str(body.get("field", ""))
        self.value = None
        self.reason = str(self)


class ControllerUnreachable(BrowserVMError):
    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"no controller answers at {url}: is `browservm serve` running?"
                         + (f" ({detail})" if detail else ""))


class KeyRefused(BrowserVMError):
    def __init__(self, url: str, source: str) -> None:
        self.url = url
        self.source = source
        super().__init__(f"the API key was refused by {url} (from {source}); the controller's key is in its "
                         f"state directory's {API_KEY_FILE}: give that directory with --state-dir, "
                         f"or the key in {KEY_ENV}")


def api_key(settings: Settings) -> tuple[str, str]:
    """The API key and where it came from: BROWSERVM_API_KEY, else <state-dir>/api.key (never made here)."""
    if settings.api_key:
        return settings.api_key, KEY_ENV
    path = settings.state_dir / API_KEY_FILE
    try:
        key = read_existing(path, "the API key").strip()  # never through a link: it goes to the URL given
    except FileNotFoundError:
        raise StateError(str(path), "no API key here: the controller makes it at its first start; give its "
                                    f"state directory with --state-dir, or the key in {KEY_ENV}") from None
    except OSError as exc:
        raise StateError(str(path), f"cannot read the API key: {exc.strerror} (it is readable by root alone); "
                                    f"run as root, or give the key in {KEY_ENV}") from None
    if not key:
        raise StateError(str(path), f"is empty; give the key in {KEY_ENV}")
    return key, str(path)


def _loopback(url: httpx.URL) -> bool:
    if url.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(url.host).is_loopback
    except ValueError:
        return False


def parse_url(value: str) -> httpx.URL:
    """The controller's base URL, or InvalidInput naming --url."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidInput("url", value, str(exc)) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInput("url", value, "must be http://HOST:PORT or https://HOST[:PORT], "
                                         "for example http://127.0.0.1:8080")
    return url


class ControllerClient:
    """The controller's REST API, one method per route; errors as BrowserVMErrors, bodies as JSON.

    Proxies and CA settings from the environment (`trust_env`) are used for a remote controller (it
    may sit behind the proxy the user configured, or use a private CA via SSL_CERT_FILE) but never
    for loopback: HTTP_PROXY is often set without 127.0.0.1 in NO_PROXY, and a proxy would then get
    the request and the API key instead of the controller on this machine.
    """

    def __init__(self, base_url: str, key: str, *, key_source: str = KEY_ENV,
                 timeout: httpx.Timeout = TIMEOUT, events_quiet: float = EVENTS_QUIET) -> None:
        url = parse_url(base_url)
        self.base_url = str(url).rstrip("/")
        self.key_source = key_source
        self.events_quiet = events_quiet
        self._http = httpx.Client(
            base_url=self.base_url, timeout=timeout, trust_env=not _loopback(url), follow_redirects=False,
            headers={"Authorization": f"Bearer {key}", "User-Agent": f"browservm/{__version__}"})

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- routes ----------------------------------------------------------------------------

    def create_vm(self, user: str, vcpus: int, mem_mib: int) -> dict[str, Any]:
        """POST /v1/vms: the new VM's record (state `creating`); it boots on the controller."""
        return cast(dict[str, Any], self._json("POST", "/v1/vms",
                                               json={"user": user, "vcpus": vcpus, "mem_mib": mem_mib}))

    def list_vms(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._json("GET", "/v1/vms"))

    def get_vm(self, vm_id: str) -> dict[str, Any]:
        return cast(dict[str, Any], self._json("GET", _vm_path(vm_id)))

    def delete_vm(self, vm_id: str) -> bool:
        """DELETE /v1/vms/{id}: True if it was there. Idempotent."""
        return bool(self._json("DELETE", _vm_path(vm_id))["removed"])

    def hosts(self) -> list[dict[str, Any]]:
        """GET /v1/hosts (a cluster's front): each host's state, capacity, allocated, heartbeat."""
        return cast(list[dict[str, Any]], self._json("GET", "/v1/hosts"))

    def drain_host(self, name: str) -> dict[str, Any]:
        """POST /v1/hosts/{name}/drain (a cluster's front): no new placements there."""
        return cast(dict[str, Any], self._json("POST", f"/v1/hosts/{quote(name, safe='')}/drain"))

    def resume_host(self, name: str) -> dict[str, Any]:
        """POST /v1/hosts/{name}/resume (a cluster's front): a drained host takes new VMs again."""
        return cast(dict[str, Any], self._json("POST", f"/v1/hosts/{quote(name, safe='')}/resume"))

    def console(self, vm_id: str, lines: int) -> list[str]:
        return list(self._json("GET", _vm_path(vm_id, "console"), params={"lines": lines})["lines"])

    def viewer(self, vm_id: str) -> dict[str, Any]:
        """POST /v1/vms/{id}/viewer: `url` (with a token bound to the VM), `token`, `expires_at`."""
        return cast(dict[str, Any], self._json("POST", _vm_path(vm_id, "viewer")))

    def events(self, vm_id: str) -> Generator[Event, None, None]:
        """GET /v1/vms/{id}/events: (event, data) pairs as they come, until the controller ends the stream."""
        yield from self.subscribe(_vm_path(vm_id, "events"))

    def subscribe(self, path: str) -> Generator[Event, None, None]:
        """An event stream of the API: (event, data) pairs as they come, until the controller ends it.

        Raises stream.Quiet after `events_quiet` seconds without a byte.
        """
        timeout = httpx.Timeout(TIMEOUT.read, connect=TIMEOUT.connect, read=self.events_quiet)
        with self._transport():
            try:
                with self._http.stream("GET", path, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    yield from server_sent_events(response.iter_lines())
            except httpx.ReadTimeout:
                raise Quiet from None

    # --- plumbing --------------------------------------------------------------------------

    def _json(self, method: str, path: str, **options: Any) -> Any:
        with self._transport():
            response = self._http.request(method, path, **options)
        self._check(response)
        try:
            return response.json()
        except ValueError:
            raise self._not_ours(response) from None

    @contextmanager
    def _transport(self) -> Iterator[None]:
        """httpx's transport errors as one clear line naming the URL."""
        try:
            yield
        except httpx.ConnectError:
            raise ControllerUnreachable(self.base_url) from None
        except httpx.TimeoutException as exc:
            raise ControllerUnreachable(self.base_url, f"no answer in time ({type(exc).__name__})") from None
        except httpx.TransportError as exc:  # refused mid-request, reset, a broken stream
            raise ControllerUnreachable(self.base_url, str(exc) or type(exc).__name__) from None

    def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        if response.status_code == 401:
            raise KeyRefused(self.base_url, self.key_source)
        try:
            body = response.json()["error"]
            if not isinstance(body, dict) or "message" not in body:
                raise TypeError(body)
        except (ValueError, KeyError, TypeError):
            raise self._not_ours(response) from None
        raise (InvalidRemoteInput if response.status_code == 422 else ControllerError)(response.status_code, body)

    def _not_ours(self, response: httpx.Response) -> ControllerError:
        """An answer that is not the API's JSON: something else listens at the URL (or in front of it)."""
        return ControllerError(response.status_code, {
            "type": "HTTPError", "message": f"{response.request.method} {response.request.url} answered "
            f"{response.status_code} {response.reason_phrase} without the API's JSON: is {self.base_url} "
            "a browservm controller?"})


def _vm_path(vm_id: str, *rest: str) -> str:
    # Checked here as local mode checks it, and quoted: an id must not become another path.
    return "/".join(("/v1/vms", quote(validate_vm_id(vm_id), safe=""), *rest))
