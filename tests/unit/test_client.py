"""browservm.client against httpx.MockTransport: what each answer becomes (results, typed errors), Server-Sent
Events parsed field by field, and wait_vm / wait_login following a stream across quiet stretches and cuts.

The same scripted controller answers the sync and the async client: both must read it the same way.
test_client_served.py runs the client against a real served controller.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from browservm.client import (
    AsyncClient,
    Client,
    Conflict,
    ControllerError,
    ControllerUnreachable,
    InvalidRequest,
    KeyRefused,
    LimitReached,
    LoginFailed,
    NotAController,
    NotFound,
    StreamEnded,
    Unavailable,
    VmFailed,
    WaitTimedOut,
)
from browservm.client.models import Event
from browservm.client.sse import server_sent_events
from browservm.errors import InvalidInput

URL = "http://controller.test:8080"
KEY = "client-test-key"
VM_ID = "vm-0123456789ab"
T = TypeVar("T")


def vm(state: str, **more: Any) -> dict[str, Any]:
    return {"vm_id": VM_ID, "state": state, "user": "ann", "vcpus": 1, "mem_mib": 1024, "stages": {}, **more}


def login(state: str, **more: Any) -> dict[str, Any]:
    return {"login_id": "lg-1", "user": "ann", "provider": "sample", "state": state, "vm_id": VM_ID, **more}


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return "".join(f"event: {kind}\ndata: {json.dumps(data)}\n\n" for kind, data in events).encode()


class Quiet(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A stream that sends `first`, then nothing: the client's read times out, as on a quiet controller."""

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        raise httpx.ReadTimeout("quiet")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.first
        raise httpx.ReadTimeout("quiet")


Handler = Callable[[httpx.Request], httpx.Response]


def both(handler: Handler, work: Callable[[Any], Any], **options: Any) -> list[Any]:
    """`work(client)` with a Client and with an AsyncClient (its coroutine awaited) on the same handler:
    each one's result, or the exception it raised."""
    results: list[Any] = []
    with Client(URL, api_key=KEY, transport=httpx.MockTransport(handler), **options) as client:
        try:
            results.append(work(client))
        except Exception as exc:
            results.append(exc)

    async def main() -> Any:
        async with AsyncClient(URL, api_key=KEY, transport=httpx.MockTransport(handler), **options) as client:
            try:
                answer = work(client)
                return await answer if asyncio.iscoroutine(answer) else answer
            except Exception as exc:
                return exc

    results.append(asyncio.run(main()))
    return results


def error(status: int, **body: Any) -> Handler:
    return lambda request: httpx.Response(status, json={"error": body})


# --- answers and errors -------------------------------------------------------------------------------


def test_a_create_sends_the_key_the_given_fields_only_and_the_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(202, json=vm("creating", host="h1"))

    made = both(handler, lambda c: c.create_vm("ann", mem_mib=512, idempotency_key="req-7"))
    assert [m.vm_id for m in made] == [VM_ID, VM_ID] and made[0].model_extra == {"host": "h1"}
    for request in seen:
        assert request.headers["authorization"] == f"Bearer {KEY}" and request.headers["idempotency-key"] == "req-7"
        assert json.loads(request.content) == {"user": "ann", "mem_mib": 512} and not request.url.query
    both(handler, lambda c: c.create_vm("ann", wait=True))
    assert seen[-1].url.params["wait"] == "true" and "idempotency-key" not in seen[-1].headers


def test_a_listing_is_read_page_after_page_with_its_filters_kept() -> None:
    seen: list[httpx.Request] = []
    pages = {None: (["vm-000000000001", "vm-000000000002"], "c1.2"), "c1.2": (["vm-000000000003"], None)}

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        ids, following = pages[request.url.params.get("cursor")]
        return httpx.Response(200, json=[vm("ready") | {"vm_id": vm_id} for vm_id in ids],
                              headers={"X-Next-Cursor": following} if following else {})

    for found in both(handler, lambda c: c.list_vms(user="ann", labels={"app": "crm", "env": "dev"})):
        assert [v.vm_id for v in found] == ["vm-000000000001", "vm-000000000002", "vm-000000000003"]
    for request in seen:
        assert request.url.params["user"] == "ann"
        assert request.url.params.get_list("label") == ["app=crm", "env=dev"]
    assert [r.url.params.get("cursor") for r in seen] == [None, "c1.2", None, "c1.2"]


def test_a_422_is_an_invalid_input_naming_the_field() -> None:
    for exc in both(error(422, type="InvalidInput", field="vcpus", message="vcpus: must be between 1 and 8"),
                    lambda c: c.create_vm("ann", vcpus=99)):
        assert isinstance(exc, InvalidRequest) and isinstance(exc, InvalidInput)
        assert (exc.status, exc.type, exc.field, str(exc)) == (422, "InvalidInput", "vcpus",
                                                               "vcpus: must be between 1 and 8")


def test_each_status_is_its_own_error_carrying_the_bodys_fields() -> None:
    cases: list[tuple[int, dict[str, Any], type[ControllerError]]] = [
        (401, {"type": "KeyRefused", "message": "no"}, KeyRefused),
        (404, {"type": "VmNotFound", "message": f"no VM {VM_ID}"}, NotFound),
        (409, {"type": "LoginRunning", "message": "running", "state": "running"}, Conflict),
        (429, {"type": "LimitExceeded", "message": "too many VMs", "limit": "max_vms_per_user"}, LimitReached),
        (503, {"type": "VaultError", "message": "the vault is locked"}, Unavailable)]
    for status, body, kind in cases:
        for exc in both(error(status, **body), lambda c: c.get_vm(VM_ID)):
            assert type(exc) is kind
            assert exc.status == status and exc.body == body and str(exc) == body["message"]
    [limited, _] = both(error(429, **cases[3][1]), lambda c: c.list_vms())
    assert limited.limit == "max_vms_per_user" and limited.field == "" and limited.state is None


def test_an_answer_without_the_apis_json_says_something_else_listens() -> None:
    for handler in (lambda r: httpx.Response(502, text="<html>bad gateway</html>"),
                    lambda r: httpx.Response(200, text="not json"),
                    lambda r: httpx.Response(200, json={"unexpected": "shape"})):
        for exc in both(handler, lambda c: c.get_vm(VM_ID)):
            assert isinstance(exc, NotAController), exc
            assert f"GET {URL}/v1/vms/{VM_ID} answered" in str(exc) and f"is {URL} a browservm controller?" in str(exc)


def test_no_controller_is_one_error_naming_the_url() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    for exc in both(refused, lambda c: c.list_vms()):
        assert isinstance(exc, ControllerUnreachable) and exc.url == URL
        assert str(exc) == f"no controller answers at {URL}: is `browservm serve` running?"


def test_ids_are_checked_before_anything_is_sent() -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={})

    for exc in both(handler, lambda c: c.get_vm("../v1/x")):
        assert isinstance(exc, InvalidInput) and exc.field == "vm_id"
    for exc in both(handler, lambda c: c.credentials("", "x")):
        assert isinstance(exc, InvalidInput) and exc.field == "user"
    assert sent == []
    with pytest.raises(InvalidInput, match="url: must be http"):
        Client("ftp://controller.test", api_key=KEY)


def test_credentials_come_back_as_bytes_and_are_never_printed() -> None:
    secret = b'{"access_token": "tok-123"}'
    body = {"user": "ann", "provider": "sample", "login_id": "lg-1", "captured_at": 1.0,
            "files": {"/home/browser/.sample/credentials.json": base64.b64encode(secret).decode()}}
    for credentials in both(lambda r: httpx.Response(200, json=body), lambda c: c.credentials("ann", "sample")):
        assert credentials.files == {"/home/browser/.sample/credentials.json": secret}
        assert "tok-123" not in repr(credentials) and "tok-123" not in str(credentials)


def test_a_fronts_hosts_are_typed() -> None:
    host = {"name": "h1", "state": "draining", "state_reason": "drained by the operator", "capacity": 8,
            "allocated": 2, "pending": 0, "heartbeat_at": "2026-12-07T02:00:00Z", "viewer_address": "10.0.0.2:8080"}
    for hosts in both(lambda r: httpx.Response(200, json=[host]), lambda c: c.hosts()):
        assert hosts[0].allocated == 2 and hosts[0].heartbeat_at.year == 2026 and hosts[0].as_json() == host


def test_a_remote_controller_may_use_the_environments_proxy_but_loopback_never() -> None:
    for url, trusted in (("http://controller.example:8080", True), ("http://127.0.0.1:8080", False),
                         ("http://[::1]:8080", False), ("http://localhost:8080", False)):
        with Client(url, api_key=KEY) as client:
            assert client._http.trust_env is trusted, url


# --- event streams --------------------------------------------------------------------------------


def test_server_sent_events_are_parsed_field_by_field() -> None:
    stream = [": keep-alive", "", "event: stage", 'data: {"event": "net.lease",', 'data: "seconds": 0.5}', "",
              "event: ready", "data:{}", "", "data: {\"x\": 1}", "", "event: orphan", ""]
    assert list(server_sent_events(iter(stream))) == [
        Event("stage", {"event": "net.lease", "seconds": 0.5}), Event("ready", {}), Event("message", {"x": 1})]


def test_vm_events_are_read_as_they_come() -> None:
    body = sse(("stage", {"event": "net.lease", "seconds": 0.1}), ("ready", {"event": "ready"}))

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == f"/v1/vms/{VM_ID}/events"
        return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})

    with Client(URL, api_key=KEY, transport=httpx.MockTransport(handler)) as client:
        assert [event.kind for event in client.vm_events(VM_ID)] == ["stage", "ready"]

    async def main() -> list[str]:
        async with AsyncClient(URL, api_key=KEY, transport=httpx.MockTransport(handler)) as client:
            return [event.kind async for event in client.vm_events(VM_ID)]
    assert asyncio.run(main()) == ["stage", "ready"]


class Controller:
    """A scripted controller for the waits: each subscription gets the next of `streams` (bytes: the stream
    then its end; Quiet: then silence); GET of the record gets the next of `records` (the last one repeated)."""

    def __init__(self, streams: list[bytes | Quiet], records: list[dict[str, Any]], path: str) -> None:
        self.streams = streams
        self.records = records
        self.path = path
        self.subscriptions = 0
        self.lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self.lock:
            if request.url.path.endswith("/events"):
                stream = self.streams[min(self.subscriptions, len(self.streams) - 1)]
                self.subscriptions += 1
                if isinstance(stream, Quiet):
                    return httpx.Response(200, stream=stream)
                return httpx.Response(200, content=stream)
            if request.url.path == self.path:
                record = self.records[0] if len(self.records) == 1 else self.records.pop(0)
                return httpx.Response(200, json=record)
            return httpx.Response(404, json={"error": {"type": "NotFound", "message": "no such route"}})

    def reset(self, streams: list[bytes | Quiet], records: list[dict[str, Any]]) -> Controller:
        return Controller(streams, records, self.path)


def test_wait_vm_subscribes_again_after_a_quiet_stretch_and_reports_each_stage_once() -> None:
    lease = ("stage", {"event": "net.lease", "seconds": 0.1, "state": "booting"})
    spawn = ("stage", {"event": "vmm.spawn", "seconds": 0.4, "state": "booting"})
    build = ("build", {"event": "build", "state": "creating", "detail": "building the kernel", "log": "/k.log"})
    for mode in ("sync", "async"):
        script = Controller([Quiet(sse(build, lease)), sse(lease, spawn, ("ready", {"event": "ready"}))],
                            [vm("booting", building="building the kernel"), vm("ready")], f"/v1/vms/{VM_ID}")
        stages: list[str] = []
        notes: list[tuple[str, str]] = []

        def work(client: Any) -> Any:
            return client.wait_vm(VM_ID, on_stage=lambda hop, s: stages.append(hop),  # noqa: B023
                                  on_note=lambda kind, detail: notes.append((kind, detail)))  # noqa: B023
        [ready] = both_one(mode, script, work, events_quiet=0.2)
        assert ready.state == "ready" and script.subscriptions == 2
        assert stages == ["net.lease", "vmm.spawn"]
        assert notes == [("build", "building the kernel"), ("log", "/k.log"), ("still", "building the kernel")]


def test_wait_vm_raises_the_failure_with_hop_and_reason_and_the_record() -> None:
    failure = {"hop": "rfb.banner", "reason": "no banner", "hint": "", "evidence": [], "vmm_log": [], "cleanup": []}
    for mode in ("sync", "async"):
        script = Controller([sse(("failed", {"event": "failed", "hop": "rfb.banner"}))],
                            [vm("failed", failure=failure)], f"/v1/vms/{VM_ID}")
        [exc] = both_one(mode, script, lambda c: c.wait_vm(VM_ID))
        assert isinstance(exc, VmFailed) and (exc.hop, exc.reason, exc.state) == ("rfb.banner", "no banner", "failed")
        assert exc.vm is not None and exc.vm.failure is not None
        assert str(exc) == f"VM {VM_ID} failed at rfb.banner: no banner"


def test_wait_vm_tells_a_deleted_vm_a_cut_stream_and_its_own_deadline() -> None:
    for mode in ("sync", "async"):
        deleted = Controller([sse(("destroyed", {"event": "destroyed"}))], [vm("ready")], f"/v1/vms/{VM_ID}")
        [exc] = both_one(mode, deleted, lambda c: c.wait_vm(VM_ID))
        assert isinstance(exc, VmFailed) and exc.vm is None and exc.state == "destroyed"
        cut = Controller([sse(("stage", {"event": "net.lease", "state": "booting"}))], [vm("booting")],
                         f"/v1/vms/{VM_ID}")
        [exc] = both_one(mode, cut, lambda c: c.wait_vm(VM_ID))
        assert isinstance(exc, StreamEnded) and exc.state == "booting"
        quiet = Controller([Quiet(b"")], [vm("booting")], f"/v1/vms/{VM_ID}")
        [exc] = both_one(mode, quiet, lambda c: c.wait_vm(VM_ID, timeout=0.5), events_quiet=0.1)
        assert isinstance(exc, WaitTimedOut) and exc.state == "booting" and quiet.subscriptions >= 2
        assert str(exc) == f"VM {VM_ID} was still booting after 0.5 s"


def test_wait_login_follows_each_state_to_captured_or_raises_the_failure() -> None:
    waiting = login("waiting-for-user", auth_url_host="issuer.test")
    for mode in ("sync", "async"):
        script = Controller([Quiet(sse(("booting", login("booting")), ("waiting-for-user", waiting))),
                             sse(("waiting-for-user", waiting), ("captured", login("captured", files=1)))],
                            [waiting], "/v1/logins/lg-1")
        states: list[str] = []
        [captured] = both_one(mode, script, lambda c: c.wait_login("lg-1", on_change=lambda l: states.append(l.state)),  # noqa: B023,E741
                              events_quiet=0.2)
        assert captured.files == 1 and states == ["booting", "waiting-for-user", "captured"]
        ended = login("failed", hop="tool", reason="exited with status 3", exit_status=3, output=["error: 500"])
        failed = Controller([sse(("failed", ended))], [waiting], "/v1/logins/lg-1")
        [exc] = both_one(mode, failed, lambda c: c.wait_login("lg-1"))
        assert isinstance(exc, LoginFailed) and (exc.state, exc.hop, exc.reason) == ("failed", "tool",
                                                                                      "exited with status 3")
        assert exc.login.output == ["error: 500"] and str(exc) == "login lg-1 failed at tool: exited with status 3"


def both_one(mode: str, handler: Handler, work: Callable[[Any], Any], **options: Any) -> list[Any]:
    """`work` with the sync or the async client alone (a scripted controller is used up by one)."""
    if mode == "sync":
        with Client(URL, api_key=KEY, transport=httpx.MockTransport(handler), **options) as client:
            try:
                return [work(client)]
            except Exception as exc:
                return [exc]

    async def main() -> Any:
        async with AsyncClient(URL, api_key=KEY, transport=httpx.MockTransport(handler), **options) as client:
            try:
                return await work(client)
            except Exception as exc:
                return exc
    return [asyncio.run(main())]


# --- what it imports ------------------------------------------------------------------------------


def test_importing_the_client_loads_nothing_of_the_server() -> None:
    """An application that only calls a controller installs httpx and pydantic, not the controller's stack."""
    code = "import sys, browservm.client, json; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout))
    assert not {name.split(".")[0] for name in loaded} & {"fastapi", "starlette", "uvicorn", "sqlite3", "websockets"}
    ours = {name for name in loaded if name.split(".")[0] == "browservm" and not name.startswith("browservm.client")}
    # The errors' roots and the VM id's check, both of the standard library alone.
    assert ours == {"browservm", "browservm.errors", "browservm.guest", "browservm.guest.errors", "browservm.ids"}
