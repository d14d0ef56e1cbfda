"""What the sync and the async client share about HTTP: the URL, the connection's options, how an answer
is read into a result or an error, and how a transport error is told.

Proxies and CA settings from the environment (httpx's `trust_env`) are used for a remote controller (it
may sit behind the proxy the user configured, or use a private CA via SSL_CERT_FILE) but never for
loopback: HTTP_PROXY is often set without 127.0.0.1 in NO_PROXY, and a proxy would then get the request
and the API key instead of the controller on this machine.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
from typing import Any, TypeVar

import httpx

from browservm import __version__
from browservm.client.errors import ControllerUnreachable, UntrustedCertificate, error_of, not_a_controller
from browservm.client.routes import Call
from browservm.errors import InvalidInput

T = TypeVar("T")

TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Between two events of a booting VM the controller is quiet for as long as a hop takes (its own
# deadlines, up to minutes). After this long without a byte the client asks for the record and
# subscribes again, so a half-open connection cannot hang a wait forever.
EVENTS_QUIET = 60.0
# A create with ?wait=true answers once the VM is ready or failed: a boot, or a first build of minutes.
WAIT_READ = 1800.0


def parse_url(value: str) -> httpx.URL:
    """The controller's base URL, or InvalidInput naming `url`."""
    try:
        url = httpx.URL(value)
    except (httpx.InvalidURL, TypeError) as exc:
        raise InvalidInput("url", value, str(exc)) from None
    if url.scheme not in ("http", "https") or not url.host:
        raise InvalidInput("url", value, "must be http://HOST:PORT or https://HOST[:PORT], "
                                         "for example http://127.0.0.1:8080")
    return url


def is_loopback(url: httpx.URL) -> bool:
    if url.host == "localhost":
        return True
    try:
        return ipaddress.ip_address(url.host).is_loopback
    except ValueError:
        return False


def options(url: httpx.URL, api_key: str, timeout: httpx.Timeout, trust_env: bool | None,
            ca_file: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """httpx.Client's or httpx.AsyncClient's arguments."""
    if not isinstance(api_key, str) or not api_key or any(c in api_key for c in "\r\n"):
        raise InvalidInput("api_key", "<hidden>", "must be the controller's key, a non-empty line")
    given: dict[str, Any] = {} if ca_file is None else {"verify": trusting(ca_file)}
    return {"base_url": str(url).rstrip("/"), "timeout": timeout, "follow_redirects": False,
            "trust_env": not is_loopback(url) if trust_env is None else trust_env,
            "headers": {"Authorization": f"Bearer {api_key}", "User-Agent": f"browservm-client/{__version__}"},
            **given}


def trusting(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """Verification against `ca_file` (PEM: a CA, or the controller's self-signed certificate) in place of
    the system's CAs: the way to reach a controller with a private certificate without turning
    verification off, which this client never does."""
    try:
        return ssl.create_default_context(cafile=os.fspath(ca_file))
    except FileNotFoundError:
        raise InvalidInput("ca_file", os.fspath(ca_file), "does not exist") from None
    except ssl.SSLError as exc:
        raise InvalidInput("ca_file", os.fspath(ca_file), f"is not a PEM certificate ({exc.reason or exc})") from None
    except OSError as exc:
        raise InvalidInput("ca_file", os.fspath(ca_file), f"cannot be read: {exc.strerror or exc}") from None


def request_options(call: Call[Any], timeout: httpx.Timeout) -> dict[str, Any]:
    """The arguments of `request()` for `call`."""
    given: dict[str, Any] = {"params": call.params, "headers": dict(call.headers)}
    if call.body is not None:
        given["json"] = dict(call.body)
    if call.waits:
        given["timeout"] = httpx.Timeout(connect=timeout.connect, read=WAIT_READ, write=timeout.write,
                                         pool=timeout.pool)
    return given


def stream_timeout(timeout: httpx.Timeout, quiet: float) -> httpx.Timeout:
    """An event stream's: it fails (StreamQuiet) after `quiet` seconds without a byte."""
    return httpx.Timeout(connect=timeout.connect, read=quiet, write=timeout.write, pool=timeout.pool)


def next_page(call: Call[T], response: httpx.Response) -> Call[T] | None:
    """The same listing's next page, while the answer names one (X-Next-Cursor)."""
    cursor = response.headers.get("x-next-cursor")
    if not call.paged or cursor is None:
        return None
    return dataclasses.replace(call, params={**(call.params or {}), "cursor": cursor})


def read(call: Call[T], response: httpx.Response, base_url: str) -> T:
    """The result of `call` from its (read) answer, or the error it means."""
    check(response, base_url)
    try:
        return call.read(response.json())
    except (ValueError, TypeError, KeyError):  # pydantic's ValidationError is a ValueError
        raise not_a_controller(response.status_code, _answered(response), base_url) from None


def check(response: httpx.Response, base_url: str) -> None:
    """Nothing for a 1xx-3xx; the error a 4xx or 5xx means (its body read already)."""
    if response.status_code < 400:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    raise error_of(response.status_code, payload, _answered(response), base_url)


def unreachable(exc: httpx.TransportError, base_url: str) -> ControllerUnreachable:
    """httpx's transport errors as one clear line naming the URL."""
    tls = _tls_error(exc)
    if isinstance(tls, ssl.SSLCertVerificationError):
        return UntrustedCertificate(base_url, tls.verify_message or tls.reason or str(tls))
    if tls is not None:
        return ControllerUnreachable(base_url, f"TLS failed: {tls.reason or tls}; if the controller serves plain "
                                               "HTTP, its URL is http://")
    if isinstance(exc, httpx.RemoteProtocolError) and base_url.startswith("http://"):
        # What a TLS port does with a plain HTTP request: it closes the connection without a word.
        return ControllerUnreachable(base_url, "it closed the connection without an answer; if it serves TLS "
                                               "(serve --tls-cert), its URL is https://")
    if isinstance(exc, httpx.ConnectError):
        return ControllerUnreachable(base_url)
    if isinstance(exc, httpx.TimeoutException):
        return ControllerUnreachable(base_url, f"no answer in time ({type(exc).__name__})")
    return ControllerUnreachable(base_url, str(exc) or type(exc).__name__)  # reset, a broken stream


def _tls_error(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error under httpx's (and httpcore's) wrapping of it, if that is what failed."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _answered(response: httpx.Response) -> str:
    return (f"{response.request.method} {response.request.url} answered {response.status_code} "
            f"{response.reason_phrase}")
