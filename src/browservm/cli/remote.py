"""`browservm vm ... --url URL`: the VM commands against a running controller's REST API.

The controller (`browservm serve`) does the work; this side sends requests and prints the answers
with vm.py's printers, so a command prints the same in both modes. What differs, on purpose:

- `vm create` posts the request, then follows the VM's Server-Sent Events (GET /v1/vms/{id}/events)
  and prints each stage on stderr as it passes; when the VM is ready it also prints a viewer link.
  Ctrl-C while it boots deletes the VM, as Ctrl-C cancels a local create.
- `vm viewer ID` exists only here: viewer links are signed and served by the controller.
- `vm console --follow` is refused: the API has the console's last lines, not a stream of them,
  and polling a tail cannot tell new lines from repeated ones.
- `--keep-failed` and `--boot-arg` are refused: the API does not take them.
- The host settings (--netns, --subnet, --kernel, ...) are the controller's own; here only
  --state-dir counts, for the API key.
- `--json` of a VM agrees with local mode field by field, except for LOCAL_ONLY and REMOTE_ONLY
  below; `vm create --json` adds `viewer` (the viewer link) when the VM is ready.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from types import TracebackType
from typing import Any, cast
from urllib.parse import quote

import httpx

from browservm import __version__
from browservm.api.keys import API_KEY_FILE
from browservm.cli import vm as output
from browservm.cli.vm import OptionUnavailable
from browservm.config import Settings
from browservm.errors import BrowserVMError, InvalidInput, StateError, WrongState
from browservm.ids import validate_vm_id
from browservm.vm.console import terminal_safe

# Fields of a VM's JSON that only one mode has (every other field agrees, by name and value).
# Local: what the record keeps that the API does not report, and the VMM checked alive by this process.
LOCAL_ONLY = frozenset({"directory", "gateway", "bridge", "guest_network_by", "pid_start_time", "failed_at",
                        "holds_resources", "keep", "owner", "viewer_epoch", "vmm_alive"})
# Remote: what only a controller knows (uptime by its clock, viewers connected, time without one).
REMOTE_ONLY = frozenset({"uptime_s", "viewers", "idle_s", "building"})

TERMINAL = ("ready", "failed", "ended", "destroyed")  # the events that end a VM's stream (api/events.py)
NOTES = ("build", "retry")  # events with a `detail` in words: a build step the VM waits for, a retry
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


class ControllerStopped(BrowserVMError):
    def __init__(self, url: str, vm_id: str, state: str) -> None:
        self.url = url
        self.vm_id = vm_id
        self.state = state
        super().__init__(f"the controller at {url} ended the event stream while VM {vm_id} was {state} (is it "
                         f"stopping?); `browservm vm show {vm_id} --url {url}` tells what became of the VM")


class _Quiet(Exception):
    """No byte on an event stream for EVENTS_QUIET seconds."""


def api_key(settings: Settings) -> tuple[str, str]:
    """The API key and where it came from: BROWSERVM_API_KEY, else <state-dir>/api.key (never made here)."""
    if settings.api_key:
        return settings.api_key, KEY_ENV
    path = settings.state_dir / API_KEY_FILE
    try:
        key = path.read_text().strip()
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

    def console(self, vm_id: str, lines: int) -> list[str]:
        return list(self._json("GET", _vm_path(vm_id, "console"), params={"lines": lines})["lines"])

    def viewer(self, vm_id: str) -> dict[str, Any]:
        """POST /v1/vms/{id}/viewer: `url` (with a token bound to the VM), `token`, `expires_at`."""
        return cast(dict[str, Any], self._json("POST", _vm_path(vm_id, "viewer")))

    def events(self, vm_id: str) -> Generator[tuple[str, dict[str, Any]], None, None]:
        """GET /v1/vms/{id}/events: (event, data) pairs as they come, until the controller ends the stream.

        Raises _Quiet after `events_quiet` seconds without a byte.
        """
        timeout = httpx.Timeout(TIMEOUT.read, connect=TIMEOUT.connect, read=self.events_quiet)
        with self._transport():
            try:
                with self._http.stream("GET", _vm_path(vm_id, "events"), timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._check(response)
                    yield from _server_sent_events(response.iter_lines())
            except httpx.ReadTimeout:
                raise _Quiet from None

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


def _server_sent_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parse text/event-stream: `event:` and `data:` fields, dispatched at each blank line."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue  # a comment, as keep-alives are
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


# --- the commands --------------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings, url: str) -> int:
    parse_url(url)
    if args.action == "create" and args.keep_failed:
        raise OptionUnavailable("keep_failed", "--keep-failed is for local mode (without --url): the controller's "
                                               "API does not take it")
    if args.action == "create" and args.boot_arg:
        raise OptionUnavailable("boot_arg", "--boot-arg is for local mode (without --url): the controller's API "
                                            "does not take it")
    if args.action == "console" and args.follow:
        raise OptionUnavailable("follow", "--follow is for local mode (without --url) on the controller's host: "
                                          "the API serves a console's last lines, not a stream of them; run "
                                          "`vm console` again for the newest")
    key, source = api_key(settings)
    with ControllerClient(url, key, key_source=source) as client:
        actions: dict[str, Callable[[ControllerClient, argparse.Namespace], int]] = {
            "create": _create, "ls": _list, "show": _show, "console": _console, "rm": _remove, "viewer": _viewer}
        return actions[args.action](client, args)


def follow(client: ControllerClient, vm_id: str, on_stage: Callable[[str, float], None],
           on_note: Callable[[str, str], None] = lambda kind, detail: None) -> dict[str, Any]:
    """Report each stage of a booting VM once, as it passes, and each build step or retry it waits through
    (`on_note`); its record once it is ready, failed or ended."""
    seen: set[str] = set()
    seen_notes: set[tuple[str, object]] = set()
    while True:
        try:
            # closing(): leaving the loop early closes the stream at once, not when it is collected
            with closing(client.events(vm_id)) as stream:
                for kind, data in stream:
                    if kind == "stage" and data["event"] not in seen:  # a new subscription repeats passed stages
                        seen.add(data["event"])
                        on_stage(data["event"], float(data.get("seconds") or 0.0))
                    elif kind in NOTES and (kind, data.get("detail")) not in seen_notes:
                        seen_notes.add((kind, data.get("detail")))
                        on_note(kind, str(data.get("detail") or ""))
                    elif kind == "destroyed":
                        raise WrongState(vm_id, "deleted", "it was deleted (vm rm) while it was being created")
                    elif kind in TERMINAL:
                        break
            record = client.get_vm(vm_id)
            if record["state"] in ("creating", "booting"):
                # No terminal event: the controller ends every stream when it stops; the VM boots on.
                raise ControllerStopped(client.base_url, vm_id, record["state"])
            return record
        except _Quiet:
            record = client.get_vm(vm_id)
            if record["state"] not in ("creating", "booting"):
                return record
            # still booting: subscribe again (the stages it already passed are skipped above)


def _create(client: ControllerClient, args: argparse.Namespace) -> int:
    started = time.monotonic()
    record = client.create_vm(args.user, args.vcpus, args.mem)
    vm_id = record["vm_id"]
    print(f"browservm: {vm_id} is being created by {client.base_url} (Ctrl-C deletes it)", file=sys.stderr,
          flush=True)

    def note(kind: str, detail: str) -> None:
        # Build steps carry no time of their own (the build is the host's, not the VM's): ours, since the POST.
        print(f"  [{time.monotonic() - started:7.2f}s] {kind:<8} {terminal_safe(detail)}", file=sys.stderr, flush=True)

    try:
        record = follow(client, vm_id, output.print_stage, note)
    except KeyboardInterrupt:
        # As a local create: Ctrl-C cancels it, and what was made is released.
        print(f"browservm: cancelled: removing VM {vm_id}", file=sys.stderr, flush=True)
        client.delete_vm(vm_id)
        raise
    ready = record["state"] == "ready"
    viewer = client.viewer(vm_id) if ready else None
    if args.json:
        output.print_vm({**record, "viewer": viewer} if viewer else record, as_json=True)
        return 0 if ready else 1
    output.print_vm(record, as_json=False)
    if viewer is not None:
        until = time.strftime("%H:%M:%S", time.localtime(viewer["expires_at"]))
        print(f"  viewer     {viewer['url']}\n             (open it in a browser before {until}; a new link: "
              f"browservm vm viewer {vm_id} --url {client.base_url})")
    return 0 if ready else 1


def _list(client: ControllerClient, args: argparse.Namespace) -> int:
    output.print_vms(client.list_vms(), args.json)
    return 0


def _show(client: ControllerClient, args: argparse.Namespace) -> int:
    try:
        record = client.get_vm(args.vm_id)
    except ControllerError as exc:
        if exc.status != 404:
            raise
        print(f"browservm: no VM {args.vm_id}", file=sys.stderr)  # as local mode says it
        return 1
    output.print_vm(record, args.json)
    return 0


def _console(client: ControllerClient, args: argparse.Namespace) -> int:
    for line in client.console(args.vm_id, args.lines):
        print(terminal_safe(line))
    return 0


def _viewer(client: ControllerClient, args: argparse.Namespace) -> int:
    viewer = client.viewer(args.vm_id)
    print(json.dumps(viewer, indent=2) if args.json else viewer["url"])
    return 0


def _remove(client: ControllerClient, args: argparse.Namespace) -> int:
    for vm_id in args.vm_ids:
        validate_vm_id(vm_id)  # all before any is removed
    output.print_removed({vm_id: client.delete_vm(vm_id) for vm_id in args.vm_ids}, args.json)
    return 0

