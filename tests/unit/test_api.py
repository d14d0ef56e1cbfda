"""The controller's REST API in-process: every route, each error a client can get, and what a client
relies on in each answer (status, the `{"error": {...}}` shape, headers).

The app is the real one (`build_app`) around a real ControllerService, store, IPAM and VMManager;
only the host network and the guest are fakes (tests/unit/fakes.py), and the "VMM" is a real
`sleep` process. HTTP goes through httpx's ASGI transport inside one event loop per test; the
WebSocket route through Starlette's TestClient. Every wait has a deadline; nothing sleeps for a
fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from browservm.api.app import MAX_BODY, build_app
from browservm.api.proxy import MAX_VIEWERS_PER_LINK, MAX_VIEWERS_PER_VM
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.config import load_settings
from browservm.controller import Controller, warm_pools
from browservm.guest import configdisk
from browservm.hostnet.host import Change, Check, HostNetwork
from browservm.profiles.keeper import Profiles
from browservm.templates import templates_for
from browservm.vm.desktop_path import RFB, desktop_path
from browservm.vm.parts import Limits
from browservm.vm.records import Failure, VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmdir import CONFIG_DISK

from .fakes import NOTHING, FakeKeeper, FakeNetwork, FakeProbes, Parts, make_parts

NAMES = desktop_path(RFB).names  # every hop of a create, on the default desktop path

T = TypeVar("T")
KEY = "operator-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
PUBLIC_URL = "https://browservm.example"
SIGNING_KEY = b"\x07" * 32
DEADLINE = 15.0  # for any one condition; a passing run meets each in well under a second
UNKNOWN = "vm-0123456789ab"  # well-formed, never created


class ServedNetwork(FakeNetwork):
    """The fake host network plus what the service asks of it: `up` (start) and `status` (/readyz)."""

    def __init__(self) -> None:
        super().__init__()
        self.checks = [Check("bridge br0", True, "up, 192.168.100.1")]

    def up(self) -> list[Change]:
        return [Change("bridge br0", "created"), Change("sysctl net.ipv4.ip_forward", "unchanged")]

    def status(self) -> list[Check]:
        return list(self.checks)


class Clock:
    """The viewer tokens' clock, moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Served:
    parts: Parts
    probes: FakeProbes
    clock: Clock
    service: ControllerService
    app: FastAPI

    def client(self, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test",
                                 headers=AUTH if headers is None else headers)

    def run(self, scenario: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
        """`scenario` with a keyed client in a fresh event loop; then the service stops (destroying every
        VM: stop_vms_on_exit) and nothing of any VM may be left."""
        async def main() -> T:
            try:
                async with self.client() as client:
                    return await scenario(client)
            finally:
                await self.service.stop()
        result = asyncio.run(main())
        assert self.parts.leftovers() == NOTHING
        return result

    def insert(self, state: VmState, vm_id: str = "vm-00000000000a", failure: Failure | None = None) -> VmRecord:
        """A record as another process (or a crash) could have left it, without a VMM. Its address is on
        loopback: a viewer that got past every check would only ever try 127.0.0.9:6080."""
        record = VmRecord(vm_id=vm_id, user="ann", vcpus=1, mem_mib=1024, state=state, failure=failure,
                          directory=str(self.parts.vm_root / vm_id), address="127.0.0.9/8")
        VmRecords(self.parts.store).insert(record, max_total=100, max_per_user=100)
        return record


def serve_fakes(state_dir: Path, network: FakeNetwork | None = None, **settings: object) -> Served:
    given: dict[str, object] = {"max_vms": 4, "max_vms_per_user": 2, "stop_vms_on_exit": True} | settings
    config = load_settings(state_dir=state_dir, api_key=KEY, public_url=PUBLIC_URL, **given)
    state_dir.mkdir(parents=True, exist_ok=True)
    parts = make_parts(state_dir)
    parts.network = network if network is not None else ServedNetwork()
    probes = FakeProbes(parts.ipam)
    templates = templates_for(config)
    manager = parts.manager(probes, limits=Limits(max_vms=config.max_vms, max_vms_per_user=config.max_vms_per_user),
                            templates=templates, pool=warm_pools(config, templates, parts.store),
                            restore_by_default=config.snapshots or config.pooling)
    controller = Controller(config, parts.store, cast(HostNetwork, parts.network), manager)
    clock = Clock()
    service = ControllerService(controller, api_key=KEY,
                                tokens=ViewerTokens(SIGNING_KEY, ttl=config.viewer_ttl, clock=clock))
    app = build_app(service)
    # The guest's profile keeper is not there: a fake in its place keeps the controller's real store.
    mounted = service.manager.profiles
    assert isinstance(mounted, Profiles)
    service.manager.profiles = FakeKeeper(mounted.store)
    return Served(parts, probes, clock, service, app)


@pytest.fixture
def served(serve: Callable[..., Served]) -> Served:
    return serve()


# --- helpers: what a client does ------------------------------------------------------------------

def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error body of `response`, which must have `status` and the one error shape."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and {"type", "message"} <= set(body["error"]), body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) for each Server-Sent Event in `text`."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        assert set(fields) == {"event", "data"}, block
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def events_of(client: httpx.AsyncClient, vm_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The VM's event stream read to its end, which comes with ready, failed, ended or destroyed."""
    response = await asyncio.wait_for(client.get(f"/v1/vms/{vm_id}/events"), DEADLINE)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    return parse_sse(response.text)


async def create(client: httpx.AsyncClient, user: str = "ann", wait: bool = True, **body: object) -> dict[str, Any]:
    response = await asyncio.wait_for(client.post("/v1/vms", params={"wait": wait}, json={"user": user, **body}),
                                      DEADLINE)
    assert response.status_code == (200 if wait else 202), response.text
    created: dict[str, Any] = response.json()
    return created


async def until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        assert loop.time() < deadline, f"not within {DEADLINE} s: {what}"
        await asyncio.sleep(0.005)


# --- auth ---------------------------------------------------------------------------------------------

# Routes anyone may reach: the viewer's (they take its token), the health check, the login form and the
# operator page (which redirects to it), static files.
PUBLIC = {"/healthz", "/view/{vm_id}", "/view/{vm_id}/state", "/view/{vm_id}/token", "/login", "/logout", "/"}


def operator_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every HTTP route but the public ones: read from the app, so a new route is covered."""
    found = [(method, route.path.replace("{vm_id}", UNKNOWN)) for route in app.routes
             if isinstance(route, APIRoute) and route.path not in PUBLIC for method in sorted(route.methods or ())]
    assert len(found) >= 11, found
    return found


def test_every_operator_route_refuses_a_missing_or_wrong_key_with_a_bearer_challenge(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for method, path in operator_routes(served.app):
            for headers in ({}, {"Authorization": "Bearer not-the-key"}, {"Authorization": f"Basic {KEY}"},
                            {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
                async with served.client(headers) as anonymous:
                    # A valid body, so nothing but the key can be what is refused.
                    response = await anonymous.request(method, path, json={"user": "ann"})
                error = error_of(response, 401)
                assert error["type"] == "Unauthorized", (method, path)
                assert response.headers["www-authenticate"] == "Bearer"
        assert (await client.get("/v1/vms")).json() == []  # nothing was created by a refused request

    served.run(scenario)


def test_a_refused_key_is_told_before_anything_about_the_request(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        async with served.client({}) as anonymous:
            assert (await anonymous.post("/v1/vms", json={"nosuch": 1})).status_code == 401
            assert (await anonymous.get("/v1/vms/NOT_AN_ID")).status_code == 401
            assert (await anonymous.get(f"/v1/vms/{UNKNOWN}/console", params={"lines": 0})).status_code == 401

    served.run(scenario)


def test_health_and_the_viewer_pages_need_no_key(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        token = (await client.post(f"/v1/vms/{vm['vm_id']}/viewer")).json()["token"]
        async with served.client({}) as anonymous:
            healthz = await anonymous.get("/healthz")
            assert (healthz.status_code, healthz.json()) == (200, {"ok": True})
            page = await anonymous.get(f"/view/{vm['vm_id']}", params={"token": token})
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert page.headers["referrer-policy"] == "no-referrer"  # the token is in the URL
            state = await anonymous.get(f"/view/{vm['vm_id']}/state", params={"token": token})
            assert state.status_code == 200 and state.json()["state"] == "ready"
        # ... and the operator's key is not a viewer token
        refused = await client.get(f"/view/{vm['vm_id']}/state")
        assert error_of(refused, 401)["type"] == "TokenRefused"
        refused = await client.get(f"/view/{vm['vm_id']}/state", params={"token": KEY})
        assert error_of(refused, 401)["type"] == "TokenRefused"

    served.run(scenario)


def test_the_login_cookie_reads_but_changes_only_with_the_browservm_header(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        async with served.client({}) as browser:
            assert (await browser.get("/")).headers["location"] == "/login"
            wrong = await browser.post("/login", data={"key": "not-the-key"})
            assert (wrong.status_code, wrong.headers["location"]) == (303, "/login?failed=true")
            assert "set-cookie" not in wrong.headers
            assert "That key is not right." in (await browser.get("/login", params={"failed": True})).text

            login = await browser.post("/login", data={"key": KEY})
            assert (login.status_code, login.headers["location"]) == (303, "/")
            cookie = login.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie and "secure" in cookie  # https public URL
            # httpx keeps a Secure cookie for https only: this client talks plain HTTP to the app
            browser.cookies.set("browservm_session", login.cookies["browservm_session"])

            page = await browser.get("/")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert (await browser.get("/v1/vms")).status_code == 200
            assert error_of(await browser.post("/v1/vms", json={"user": "ann"}), 403)["type"] == "Forbidden"
            assert (await client.get("/v1/vms")).json() == []
            created = await browser.post("/v1/vms", json={"user": "ann"}, params={"wait": True},
                                         headers={"X-Browservm": "1"})
            assert created.status_code == 200, created.text
            vm_id = created.json()["vm_id"]
            assert error_of(await browser.delete(f"/v1/vms/{vm_id}"), 403)["type"] == "Forbidden"
            assert error_of(await browser.post(f"/v1/vms/{vm_id}/viewer"), 403)["type"] == "Forbidden"
            deleted = await browser.delete(f"/v1/vms/{vm_id}", headers={"X-Browservm": "1"})
            assert deleted.json() == {"vm_id": vm_id, "removed": True}

            browser.cookies.set("browservm_session", "0" * 64)  # a forged or stale session
            error_of(await browser.get("/v1/vms"), 401)

    served.run(scenario)


# --- VMs ----------------------------------------------------------------------------------------------

def test_a_created_vm_is_accepted_at_once_then_passes_every_hop_in_order(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> dict[str, Any]:
        created = await create(client, wait=False, vcpus=2, mem_mib=512)
        assert created["state"] == "creating" and created["failure"] is None and created["stages"] == {}
        assert (created["user"], created["vcpus"], created["mem_mib"]) == ("ann", 2, 512)
        events = await events_of(client, created["vm_id"])
        assert [name for name, _ in events] == ["stage"] * len(NAMES) + ["ready"]
        assert [data["event"] for _, data in events] == [*NAMES, "ready"]
        assert all(data["vm_id"] == created["vm_id"] for _, data in events)
        got: dict[str, Any] = (await client.get(f"/v1/vms/{created['vm_id']}")).json()
        return got

    vm = served.run(scenario)
    assert vm["state"] == "ready" and list(vm["stages"]) == list(NAMES)
    assert vm["viewers"] == 0 and isinstance(vm["idle_s"], float) and 0 <= vm["idle_s"] < DEADLINE
    assert vm["failure"] is None and vm["ended_reason"] == ""
    assert vm["address"].startswith("192.168.100.") and vm["tap"] and vm["mac"].startswith("02:fc:")
    assert vm["driver"] == "fake" and isinstance(vm["pid"], int)


def test_waiting_for_a_create_answers_200_with_the_ready_vm(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, wait=True)
        assert vm["state"] == "ready" and list(vm["stages"]) == list(NAMES)
        listed = (await client.get("/v1/vms")).json()
        assert [v["vm_id"] for v in listed] == [vm["vm_id"]] and listed[0]["state"] == "ready"

    served.run(scenario)


def test_defaults_apply_only_where_a_size_is_left_out(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, vcpus=None, mem_mib=None)
        assert (vm["vcpus"], vm["mem_mib"]) == (1, 1024)

    served.run(scenario)


def test_a_failing_hop_is_named_with_its_reason_in_the_record_and_the_events(served: Served) -> None:
    served.probes.fail["net.arp"] = "no ARP reply from 192.168.100.2 within 30 s"

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, wait=True)
        assert vm["state"] == "failed"
        failure = vm["failure"]
        assert (failure["hop"], failure["reason"]) == ("net.arp", "no ARP reply from 192.168.100.2 within 30 s")
        assert failure["hint"] and failure["cleanup"] == [] and isinstance(failure["evidence"], list)
        assert list(vm["stages"]) == list(NAMES[:NAMES.index("net.arp")])
        assert (await client.get(f"/v1/vms/{vm['vm_id']}")).json()["failure"] == failure
        events = await events_of(client, vm["vm_id"])
        assert [data["event"] for _, data in events] == [*vm["stages"], "failed"]
        name, data = events[-1]
        assert (name, data["hop"], data["reason"], data["state"]) == ("failed", "net.arp", failure["reason"],
                                                                      "failed")

    served.run(scenario)


def test_events_follow_a_vm_live_until_it_is_ready(served: Served) -> None:
    release = served.probes.hang_at("desktop.ready")

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, wait=False)
        await asyncio.wait_for(served.probes.reached["desktop.ready"].wait(), DEADLINE)
        reading = asyncio.ensure_future(events_of(client, vm["vm_id"]))
        # Released only once the stream is subscribed: what follows comes live, not from the record.
        await until(lambda: vm["vm_id"] in served.service.events._subscribers, "the stream subscribes")
        release.set()
        events = await reading
        assert [data["event"] for _, data in events] == [*NAMES, "ready"]
        assert [name for name, _ in events][-1] == "ready"
        seconds = [data["seconds"] for _, data in events[:-1]]
        assert seconds == sorted(seconds) and all(isinstance(s, float) for s in seconds)

    served.run(scenario)


def test_events_of_a_vm_that_fails_while_watched_end_with_failed(served: Served) -> None:
    release = served.probes.hang_at("rfb.banner")
    served.probes.fail["rfb.banner"] = "expected 101 Switching Protocols, got 200 OK"

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, wait=False)
        await asyncio.wait_for(served.probes.reached["rfb.banner"].wait(), DEADLINE)
        reading = asyncio.ensure_future(events_of(client, vm["vm_id"]))
        await until(lambda: vm["vm_id"] in served.service.events._subscribers, "the stream subscribes")
        release.set()
        events = await reading
        passed = list(NAMES[:NAMES.index("rfb.banner")])
        assert [data["event"] for _, data in events] == [*passed, "failed"]
        assert events[-1][1]["hop"] == "rfb.banner" and "101" in events[-1][1]["reason"]

    served.run(scenario)


def test_delete_is_idempotent_and_a_deleted_vm_is_gone(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        first = await client.delete(f"/v1/vms/{vm['vm_id']}")
        assert (first.status_code, first.json()) == (200, {"vm_id": vm["vm_id"], "removed": True})
        again = await client.delete(f"/v1/vms/{vm['vm_id']}")
        assert (again.status_code, again.json()) == (200, {"vm_id": vm["vm_id"], "removed": False})
        assert served.parts.leftovers() == NOTHING
        for method, path in (("GET", ""), ("GET", "/console"), ("GET", "/events"), ("POST", "/viewer")):
            error = error_of(await client.request(method, f"/v1/vms/{vm['vm_id']}{path}"), 404)
            assert error["type"] == "VmNotFound" and vm["vm_id"] in error["message"]
        assert (await client.get("/v1/vms")).json() == []

    served.run(scenario)


def test_a_delete_that_cannot_release_everything_says_what_and_can_be_retried(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        served.parts.network.remove_fails = True
        error = error_of(await client.delete(f"/v1/vms/{vm['vm_id']}"), 500)
        assert error["type"] == "CleanupFailed" and "tap: " in error["message"] and "busy" in error["message"]
        kept = (await client.get(f"/v1/vms/{vm['vm_id']}")).json()  # still there, still counted
        assert kept["state"] == "destroying"
        served.parts.network.remove_fails = False
        assert (await client.delete(f"/v1/vms/{vm['vm_id']}")).json()["removed"] is True
        error_of(await client.get(f"/v1/vms/{vm['vm_id']}"), 404)

    served.run(scenario)


def test_the_event_stream_of_a_vm_deleted_before_it_is_read_says_destroyed(served: Served) -> None:
    """The route checks the VM exists, then the stream reads it again: a delete in between ends the stream
    with `destroyed` instead of an error in the middle of a response already started."""
    async def scenario(client: httpx.AsyncClient) -> None:
        events = [event async for event in served.service.stream(UNKNOWN)]
        assert [(event.event, event.state) for event in events] == [("destroyed", "deleted")]

    served.run(scenario)


def test_a_create_in_flight_is_undone_by_a_delete(served: Served) -> None:
    served.probes.hang_at("net.arp")

    async def scenario(client: httpx.AsyncClient) -> None:
        waiting = asyncio.ensure_future(client.post("/v1/vms", params={"wait": True}, json={"user": "ann"}))
        await asyncio.wait_for(served.probes.reached["net.arp"].wait(), DEADLINE)
        [vm] = (await client.get("/v1/vms")).json()
        assert vm["state"] == "booting"
        assert (await client.delete(f"/v1/vms/{vm['vm_id']}")).json()["removed"] is True
        answer = await asyncio.wait_for(waiting, DEADLINE)
        # The waiting client learns its VM was not made, and what became of it (the delete may still be
        # finishing when it is told).
        error = error_of(answer, 409)
        assert error["type"] == "StateConflict" and error["state"] in ("failed", "destroying", "deleted"), error
        assert served.parts.leftovers() == NOTHING
        assert (await client.get("/v1/vms")).json() == []

    served.run(scenario)


def test_a_client_that_leaves_a_waited_create_does_not_take_the_vm_with_it(served: Served) -> None:
    release = served.probes.hang_at("net.arp")

    async def scenario(client: httpx.AsyncClient) -> None:
        waiting = asyncio.ensure_future(client.post("/v1/vms", params={"wait": True}, json={"user": "ann"}))
        await asyncio.wait_for(served.probes.reached["net.arp"].wait(), DEADLINE)
        waiting.cancel()  # the client hangs up
        with pytest.raises(asyncio.CancelledError):
            await waiting
        release.set()
        [vm] = (await client.get("/v1/vms")).json()
        events = await events_of(client, vm["vm_id"])
        assert events[-1][0] == "ready"
        assert (await client.get(f"/v1/vms/{vm['vm_id']}")).json()["state"] == "ready"

    served.run(scenario)


def test_console_returns_the_last_lines_within_bounds(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        console = served.parts.vm_root / vm["vm_id"] / "console.log"
        console.write_text("".join(f"line {i}\n" for i in range(100)))
        response = await client.get(f"/v1/vms/{vm['vm_id']}/console", params={"lines": 3})
        assert response.json() == {"vm_id": vm["vm_id"], "lines": ["line 97", "line 98", "line 99"]}
        assert len((await client.get(f"/v1/vms/{vm['vm_id']}/console")).json()["lines"]) == 50  # the default
        assert len((await client.get(f"/v1/vms/{vm['vm_id']}/console", params={"lines": 10_000})).json()[
            "lines"]) == 100
        for lines in (0, -1, 10_001, "many", 1.5):
            error = error_of(await client.get(f"/v1/vms/{vm['vm_id']}/console", params={"lines": lines}), 422)
            assert (error["type"], error["field"]) == ("InvalidInput", "lines"), lines

    served.run(scenario)


def test_a_viewer_link_carries_a_token_for_that_vm(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        viewer = (await client.post(f"/v1/vms/{vm['vm_id']}/viewer")).json()
        assert set(viewer) == {"url", "token", "expires_at", "expires_at_rfc3339"}
        assert viewer["url"] == f"{PUBLIC_URL}/view/{vm['vm_id']}?token={viewer['token']}"
        assert viewer["expires_at"] == int(served.clock.now + served.service.tokens.ttl)
        state = (await client.get(f"/view/{vm['vm_id']}/state", params={"token": viewer["token"]})).json()
        assert state == {"state": "ready", "stages": list(NAMES), "hops": list(NAMES),
                         "browser_ready": True, "building": None, "failure": None, "ended_reason": None,
                         "expires_at": vm["expires_at"], "clipboard": {"paste": True, "copy": True}}

    served.run(scenario)


# --- bad input ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "field"), [
    ({"user": "ann", "colour": "red"}, "colour"),
    ({}, "user"),
    ({"vcpus": 1}, "user"),
    ({"user": ""}, "user"),
    ({"user": "u" * 65}, "user"),
    ({"user": 7}, "user"),
    ({"user": None}, "user"),
    ({"user": ["ann"]}, "user"),
    ({"user": "ann\x00"}, "user"),
    ({"user": "ann\n"}, "user"),
    # The controller's own VMs' names, in any spelling that normalises to them (issue 18: a VM
    # created as the pool's user was handed to the next user as a pooled one).
    ({"user": "BrowserVM-Pool"}, "user"),
    ({"user": " browservm-pool "}, "user"),
    ({"user": "\uff42rowservm-pool"}, "user"),  # a full-width b: NFKC makes it "b"
    ({"user": "BROWSERVM-SNAPSHOT"}, "user"),
    ({"user": "ann", "vcpus": "2"}, "vcpus"),
    ({"user": "ann", "vcpus": 1.5}, "vcpus"),
    ({"user": "ann", "vcpus": True}, "vcpus"),
    ({"user": "ann", "vcpus": 0}, "vcpus"),
    ({"user": "ann", "vcpus": -1}, "vcpus"),
    ({"user": "ann", "vcpus": 9}, "vcpus"),
    ({"user": "ann", "vcpus": 2**70}, "vcpus"),
    ({"user": "ann", "mem_mib": "1024"}, "mem_mib"),
    ({"user": "ann", "mem_mib": 1024.5}, "mem_mib"),
    ({"user": "ann", "mem_mib": False}, "mem_mib"),
    ({"user": "ann", "mem_mib": 0}, "mem_mib"),
    ({"user": "ann", "mem_mib": 255}, "mem_mib"),
    ({"user": "ann", "mem_mib": 16385}, "mem_mib"),
    ([], "body"),
    ("ann", "body"),
    (None, "body"),
])
def test_a_bad_create_is_a_422_naming_the_field_and_makes_nothing(served: Served, body: object, field: str) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/vms", content=json.dumps(body), headers={"Content-Type": "application/json"})
        error = error_of(response, 422)
        assert (error["type"], error["field"]) == ("InvalidInput", field), error
        assert error["message"].startswith(f"{field}: ") or field in error["message"]
        assert (await client.get("/v1/vms")).json() == []

    served.run(scenario)
    assert served.parts.network.calls == []


@pytest.mark.parametrize("body", [b"{", b'{"user": "ann",}', b"\xff\xfe", b'{"user": "ann"} trailing',
                                  b'{"user": "\xdaann"}'])
def test_a_body_that_is_not_json_is_a_422_naming_the_body(served: Served, body: bytes) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/vms", content=body, headers={"Content-Type": "application/json"})
        error = error_of(response, 422)
        assert (error["type"], error["field"]) == ("InvalidInput", "body"), error

    served.run(scenario)


def test_a_query_flag_that_is_not_a_boolean_is_a_422(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/vms", params={"wait": "perhaps"}, json={"user": "ann"})
        assert error_of(response, 422)["field"] == "wait"
        assert (await client.get("/v1/vms")).json() == []

    served.run(scenario)


@pytest.mark.parametrize("vm_id", ["VM-UPPER", "vm_under", "-vm", "vm-", "v" * 64, "vm.dot", "vm%20space"])
def test_a_malformed_vm_id_in_a_path_is_a_422_naming_vm_id(served: Served, vm_id: str) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/console"), ("GET", "/events"),
                               ("POST", "/viewer")):
            error = error_of(await client.request(method, f"/v1/vms/{vm_id}{suffix}"), 422)
            assert (error["type"], error["field"]) == ("InvalidVmId", "vm_id"), (method, suffix, error)

    served.run(scenario)


def test_an_unknown_vm_is_a_404_and_deleting_it_removes_nothing(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for method, suffix in (("GET", ""), ("GET", "/console"), ("GET", "/events"), ("POST", "/viewer")):
            error = error_of(await client.request(method, f"/v1/vms/{UNKNOWN}{suffix}"), 404)
            assert error == {"type": "VmNotFound", "message": f"no VM {UNKNOWN}"}
        assert (await client.delete(f"/v1/vms/{UNKNOWN}")).json() == {"vm_id": UNKNOWN, "removed": False}
        error = error_of(await client.get("/v2/nothing"), 404)
        assert error["type"] == "HTTPError"

    served.run(scenario)


def test_a_method_a_route_does_not_have_is_a_405_saying_which_it_has(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.put("/v1/vms")
        assert error_of(response, 405)["type"] == "HTTPError"
        assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST"}

    served.run(scenario)


def test_over_the_per_user_and_host_limits_is_a_429_naming_the_limit(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for _ in range(2):
            await create(client, user="ann")
        error = error_of(await client.post("/v1/vms", json={"user": "ann"}), 429)
        assert (error["type"], error["limit"]) == ("LimitExceeded", "max_vms_per_user")
        assert "'ann' already has 2 VMs" in error["message"]
        for _ in range(2):
            await create(client, user="bob")
        error = error_of(await client.post("/v1/vms", json={"user": "cat"}), 429)
        assert (error["type"], error["limit"]) == ("LimitExceeded", "max_vms")
        assert len((await client.get("/v1/vms")).json()) == 4

    served.run(scenario)


def test_a_viewer_for_a_vm_that_cannot_be_viewed_is_a_409_with_its_state(served: Served) -> None:
    served.probes.fail["guest.network"] = "the guest's network configurator reported disabled"

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        assert vm["state"] == "failed"
        error = error_of(await client.post(f"/v1/vms/{vm['vm_id']}/viewer"), 409)
        assert (error["type"], error["state"]) == ("WrongState", "failed")

    served.run(scenario)


def test_a_body_over_64_kib_is_a_413_announced_or_streamed(served: Served) -> None:
    big = json.dumps({"user": "ann", "pad": "x" * MAX_BODY}).encode()

    async def chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start:start + size]

    async def scenario(client: httpx.AsyncClient) -> None:
        announced = await client.post("/v1/vms", content=big, headers={"Content-Type": "application/json"})
        assert error_of(announced, 413)["type"] == "BodyTooLarge"
        streamed = await client.post("/v1/vms", content=chunks(big), headers={"Content-Type": "application/json"})
        assert "content-length" not in streamed.request.headers
        assert error_of(streamed, 413)["type"] == "BodyTooLarge"
        # not only where the body is JSON: the login form too
        form = await client.post("/login", content=chunks(b"key=" + b"k" * MAX_BODY),
                                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert error_of(form, 413)["type"] == "BodyTooLarge"
        # a streamed body within the limit is read whole
        small = json.dumps({"user": "ann"}).encode()
        accepted = await client.post("/v1/vms", content=chunks(small, 3), headers={"Content-Type": "application/json"})
        assert accepted.status_code == 202, accepted.text
        exactly = await client.post("/login", content=b"key=" + b"k" * (MAX_BODY - 4),
                                    headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert exactly.status_code == 303  # at the limit: read, and the key is wrong
        assert len((await client.get("/v1/vms")).json()) == 1

    served.run(scenario)


# --- viewer tokens -------------------------------------------------------------------------------------

def test_a_viewer_token_opens_only_its_own_vm_while_it_lives(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        a, b = await create(client, user="ann"), await create(client, user="bob")
        token = (await client.post(f"/v1/vms/{a['vm_id']}/viewer")).json()["token"]
        assert (await client.get(f"/view/{a['vm_id']}/state", params={"token": token})).status_code == 200

        error = error_of(await client.get(f"/view/{b['vm_id']}/state", params={"token": token}), 401)
        assert error["type"] == "TokenRefused" and "another VM" in error["message"]

        head, _, signature = token.rpartition(".")
        tampered = [f"{head}.{signature[:-1]}{'A' if signature[-1] != 'A' else 'B'}",  # the signature
                    token.replace(a["vm_id"], b["vm_id"]),  # re-addressed to another VM
                    f"v1.{a['vm_id']}.{int(served.clock.now) + 10**6}.{signature}",  # a later expiry
                    "v2" + token[2:], token + "x" * 300, "", "v1...", "v1.a.b.c.d"]
        for forged in tampered:
            response = await client.get(f"/view/{a['vm_id']}/state", params={"token": forged})
            assert error_of(response, 401)["type"] == "TokenRefused", forged

        served.clock.now += served.service.tokens.ttl + 1
        error = error_of(await client.get(f"/view/{a['vm_id']}/state", params={"token": token}), 401)
        assert "expired" in error["message"]
        fresh = (await client.post(f"/v1/vms/{a['vm_id']}/viewer")).json()["token"]
        assert (await client.get(f"/view/{a['vm_id']}/state", params={"token": fresh})).status_code == 200

        # Deleted: the VM is gone, so is every token of it; the page says the VM is gone (it cannot be opened
        # by any token, and a new link cannot be had for it).
        await client.delete(f"/v1/vms/{a['vm_id']}")
        error = error_of(await client.get(f"/view/{a['vm_id']}/state", params={"token": fresh}), 404)
        assert error["type"] == "VmNotFound"

        # A later VM with the same id has a new epoch: the old token does not open it.
        VmRecords(served.parts.store).insert(
            VmRecord(vm_id=a["vm_id"], user="ann", vcpus=1, mem_mib=1024, state=VmState.BOOTING,
                     directory=str(served.parts.vm_root / a["vm_id"])), max_total=100, max_per_user=100)
        error = error_of(await client.get(f"/view/{a['vm_id']}/state", params={"token": fresh}), 401)
        assert "not valid for this VM" in error["message"]
        newest = (await client.post(f"/v1/vms/{a['vm_id']}/viewer")).json()["token"]
        state = (await client.get(f"/view/{a['vm_id']}/state", params={"token": newest})).json()
        assert state["state"] == "booting" and state["browser_ready"] is False

    served.run(scenario)


@pytest.mark.parametrize("expiry", ["\u00b2", "1\u00b9", "\u2460", "-1", "1e9", " 1", "\u0661\u0662"])
def test_a_token_whose_expiry_is_not_plain_digits_is_refused_not_an_error(served: Served, expiry: str) -> None:
    """Superscripts and circled numbers are digits to str.isdigit but not to int(): refused, not a 500."""
    record = served.insert(VmState.BOOTING)
    token, _ = served.service.tokens.issue(record.vm_id, record.viewer_epoch)
    _, vm_id, _, signature = token.split(".")
    forged = f"v1.{vm_id}.{expiry}.{signature}"

    with TestClient(served.app) as client:
        code, reason = refusal(client, f"/v1/vms/{vm_id}/vnc?token={quote(forged)}")
    assert code == 4401, reason

    async def scenario(client: httpx.AsyncClient) -> None:
        error = error_of(await client.get(f"/view/{vm_id}/state", params={"token": forged}), 401)
        assert error["type"] == "TokenRefused", error

    served.run(scenario)


@pytest.mark.parametrize("signature", ["\u00e9", "\u00e9" * 43, "\U0001f600", "\x00", "\udcff", ""])
def test_a_token_whose_signature_is_not_ascii_is_refused_not_an_error(served: Served, signature: str) -> None:
    """compare_digest raises TypeError on a str that is not ASCII: an unauthenticated 500 (issue 18)."""
    record = served.insert(VmState.READY)
    forged = f"v1.{record.vm_id}.9999999999.{signature}"

    with TestClient(served.app) as client:
        code, reason = refusal(client, f"/v1/vms/{record.vm_id}/vnc?token={quote(forged, errors='surrogatepass')}")
    assert (code, reason) == (4401, "the viewer token is not valid for this VM (revoked, or not signed by this "
                                     "controller)")

    async def scenario(client: httpx.AsyncClient) -> None:
        error = error_of(await client.get(f"/view/{record.vm_id}/state?token={quote(forged, errors='surrogatepass')}"),
                         401)
        assert error["type"] == "TokenRefused", error

    served.run(scenario)


def test_the_view_state_of_a_malformed_id_is_a_404_not_an_error(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        for vm_id in ("NOPE", "x" * 200):
            error = error_of(await client.get(f"/view/{vm_id}/state", params={"token": "v1.a.1.b"}), 404)
            assert error["type"] == "VmNotFound" and len(error["message"]) < 80

    served.run(scenario)


# --- the WebSocket: accepted, then closed with a code and a reason the viewer page can show ---------------

def refusal(client: TestClient, path: str) -> tuple[int, str]:
    """The close code and reason of a WebSocket the server accepted and then closed."""
    # Entering the first context means the server accepted the WebSocket; the close comes after.
    with client.websocket_connect(path) as websocket, pytest.raises(WebSocketDisconnect) as closed:
        websocket.receive_bytes()
    return closed.value.code, closed.value.reason


def test_the_websocket_refuses_after_accepting_with_4401_4404_4409(served: Served) -> None:
    booting = served.insert(VmState.BOOTING, "vm-00000000000b")
    failed = served.insert(VmState.FAILED, "vm-00000000000f",
                           Failure(hop="net.arp", reason="no ARP reply", hint="look at the bridge"))
    other = served.insert(VmState.READY, "vm-00000000000c")
    tokens = served.service.tokens
    booting_token, _ = tokens.issue(booting.vm_id, booting.viewer_epoch)
    with TestClient(served.app) as client:
        code, reason = refusal(client, f"/v1/vms/{booting.vm_id}/vnc?token={booting_token}")
        assert (code, reason) == (4409, "the VM is booting")
        failed_token, _ = tokens.issue(failed.vm_id, failed.viewer_epoch)
        code, reason = refusal(client, f"/v1/vms/{failed.vm_id}/vnc?token={failed_token}")
        assert (code, reason) == (4409, "the VM is failed at net.arp: no ARP reply")

        code, reason = refusal(client, f"/v1/vms/{other.vm_id}/vnc?token={booting_token}")
        assert code == 4401 and "another VM" in reason
        code, reason = refusal(client, f"/v1/vms/{other.vm_id}/vnc")
        assert code == 4401 and "no viewer token" in reason
        # The operator's key is not a viewer token.
        with client.websocket_connect(f"/v1/vms/{other.vm_id}/vnc", headers=AUTH) as websocket, \
                pytest.raises(WebSocketDisconnect) as closed:
            websocket.receive_bytes()
        assert closed.value.code == 4401
        head, _, signature = booting_token.rpartition(".")
        code, reason = refusal(client, f"/v1/vms/{booting.vm_id}/vnc?token={head}.{signature[::-1]}")
        assert code == 4401 and "not valid" in reason

        served.clock.now += tokens.ttl + 1
        code, reason = refusal(client, f"/v1/vms/{booting.vm_id}/vnc?token={booting_token}")
        assert code == 4401 and "expired" in reason

        for vm_id in (UNKNOWN, "NOT-AN-ID", "x" * 300):
            code, reason = refusal(client, f"/v1/vms/{vm_id}/vnc?token={booting_token}")
            assert code == 4404 and reason.startswith("no VM ") and len(reason.encode()) <= 123

        # Deleted, then the id reused: 4404 while it is gone, 4401 for the new VM of that id.
        served.clock.now -= tokens.ttl + 1
        assert client.delete(f"/v1/vms/{booting.vm_id}", headers=AUTH).json()["removed"] is True
        code, _ = refusal(client, f"/v1/vms/{booting.vm_id}/vnc?token={booting_token}")
        assert code == 4404
        served.insert(VmState.BOOTING, booting.vm_id)
        code, reason = refusal(client, f"/v1/vms/{booting.vm_id}/vnc?token={booting_token}")
        assert code == 4401 and "not valid" in reason
    # Refusals leave nothing behind in the service: no viewer counted, nothing kept per VM id tried.
    assert served.service.proxy.viewers == 0
    assert served.service.describe(other).viewers == 0
    assert served.service._gone == {}


def test_a_viewer_is_counted_while_connected_and_closed_with_4410_when_its_vm_is_deleted(served: Served) -> None:
    # The VM's "desktop": a loopback address of its own whose port 6080 completes TCP handshakes (the
    # listen backlog) but never answers the upgrade, so the viewer stays connected until the delete.
    desktop = socket.socket()
    try:
        desktop.bind(("127.0.0.2", 6080))
    except OSError as exc:
        desktop.close()
        pytest.skip(f"cannot listen on 127.0.0.2:6080 for the VM's desktop: {exc.strerror}")
    desktop.listen(8)
    record = VmRecord(vm_id="vm-0000000000ee", user="ann", vcpus=1, mem_mib=1024, state=VmState.READY,
                      directory=str(served.parts.vm_root / "vm-0000000000ee"), address="127.0.0.2/8")
    VmRecords(served.parts.store).insert(record, max_total=100, max_per_user=100)
    Path(record.directory).mkdir(parents=True)
    configdisk.write(Path(record.directory) / CONFIG_DISK, {"secrets": {"vnc": "abcd1234"}})
    token, _ = served.service.tokens.issue(record.vm_id, record.viewer_epoch)
    try:
        with TestClient(served.app) as client, \
                client.websocket_connect(f"/v1/vms/{record.vm_id}/vnc?token={token}") as websocket:
            deadline = time.monotonic() + DEADLINE
            while (vm := client.get(f"/v1/vms/{record.vm_id}", headers=AUTH).json())["viewers"] != 1:
                assert time.monotonic() < deadline, "the viewer was not counted"
                time.sleep(0.005)
            assert vm["idle_s"] is None  # watched: not idle
            later = time.time() + served.service.settings.idle_timeout + 1  # idle long enough, but within its lifetime
            records = [VmRecords(served.parts.store).get(record.vm_id)]
            assert served.service.due_for_reaping([r for r in records if r], later) == {}  # not reaped
            assert client.delete(f"/v1/vms/{record.vm_id}", headers=AUTH).json()["removed"] is True
            with pytest.raises(WebSocketDisconnect) as closed:
                websocket.receive_bytes()
            assert (closed.value.code, closed.value.reason) == (4410, "the VM was deleted")
    finally:
        desktop.close()
    assert served.service.proxy.viewers == 0 and served.service._gone == {}


def test_viewers_are_capped_per_link_and_per_vm_with_4429(served: Served) -> None:
    """Each viewer holds memory in the controller and a connection in the guest: a link opened over and
    over (issue 18: 20 connections on one token took the controller from 113 to 1,154 MiB) is refused."""
    desktop = socket.socket()  # a desktop that accepts connections and never answers (as above)
    try:
        desktop.bind(("127.0.0.3", 6080))
    except OSError as exc:
        desktop.close()
        pytest.skip(f"cannot listen on 127.0.0.3:6080 for the VM's desktop: {exc.strerror}")
    desktop.listen(32)
    record = VmRecord(vm_id="vm-0000000000ef", user="ann", vcpus=1, mem_mib=1024, state=VmState.READY,
                      directory=str(served.parts.vm_root / "vm-0000000000ef"), address="127.0.0.3/8")
    VmRecords(served.parts.store).insert(record, max_total=100, max_per_user=100)
    Path(record.directory).mkdir(parents=True)
    configdisk.write(Path(record.directory) / CONFIG_DISK, {"secrets": {"vnc": "abcd1234"}})
    links = []
    for ttl in (600, 601, 602):  # three links (issued in the same second with one ttl, they would be one)
        served.service.tokens.ttl = ttl
        links.append(served.service.tokens.issue(record.vm_id, record.viewer_epoch)[0])
    path = f"/v1/vms/{record.vm_id}/vnc?token="

    def wait_viewers(client: TestClient, n: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while client.get(f"/v1/vms/{record.vm_id}", headers=AUTH).json()["viewers"] != n:
            assert time.monotonic() < deadline, f"not {n} viewers"
            time.sleep(0.005)

    try:
        with TestClient(served.app) as client, contextlib.ExitStack() as open_viewers:
            for _ in range(MAX_VIEWERS_PER_LINK):
                open_viewers.enter_context(client.websocket_connect(path + links[0]))
            wait_viewers(client, MAX_VIEWERS_PER_LINK)
            assert refusal(client, path + links[0]) == (4429, f"this viewer link is open in {MAX_VIEWERS_PER_LINK} "
                                                              "viewers already, the most one link takes")
            for _ in range(MAX_VIEWERS_PER_VM - MAX_VIEWERS_PER_LINK):
                open_viewers.enter_context(client.websocket_connect(path + links[1]))
            wait_viewers(client, MAX_VIEWERS_PER_VM)
            assert refusal(client, path + links[2]) == (4429, f"the VM has {MAX_VIEWERS_PER_VM} viewers already, "
                                                              "the most it takes")
        assert served.service._per_link == {} and served.service.proxy.viewers == 0
    finally:
        desktop.close()


# --- health, metrics, docs -----------------------------------------------------------------------------

def test_metrics_count_vms_by_state_and_time_each_stage(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> str:
        await create(client, user="ann")
        served.probes.fail["rfb.banner"] = "websockify closed the WebSocket"
        assert (await create(client, user="bob"))["state"] == "failed"
        served.probes.fail.clear()
        await create(client, user="bob")
        response = await client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return response.text

    text = served.run(scenario)
    lines = set(text.splitlines())
    assert {'browservm_vms{state="ready"} 2.0', 'browservm_vms{state="failed"} 1.0',
            'browservm_vms{state="creating"} 0.0', 'browservm_failures_total{hop="rfb.banner"} 1.0',
            'browservm_stage_seconds_count{stage="net.lease"} 3.0',
            'browservm_stage_seconds_count{stage="desktop.complete"} 2.0', "browservm_viewers 0.0",
            'browservm_ready_seconds_count{started_from="cold"} 2.0'} <= lines, text
    assert any(line.startswith('browservm_stage_seconds_bucket{le="+Inf",stage="rfb.banner"}') for line in lines)
    assert "# TYPE browservm_stage_seconds histogram" in lines


def test_readyz_names_each_check_and_is_503_when_one_fails(serve: Callable[..., Served]) -> None:
    served = serve()
    network = served.parts.network
    assert isinstance(network, ServedNetwork)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.get("/readyz")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["ok"] is True and set(body["checks"]) == {"store", "host network", "vmm", "accelerator"}
        assert body["checks"]["accelerator"]["detail"] == "tcg: the fake driver's"  # the driver's own words
        assert all(check["ok"] is True and isinstance(check["detail"], str) for check in body["checks"].values())
        network.checks.append(Check("nftables table inet browservm", False, "missing"))
        response = await client.get("/readyz")
        assert response.status_code == 503
        body = response.json()
        assert body["ok"] is False and body["checks"]["store"]["ok"] is True
        assert body["checks"]["host network"] == {"ok": False, "detail": "nftables table inet browservm: missing"}

    served.run(scenario)

    # A host network that cannot even say how it is (netlink refuses): a failing check, not a 500.
    class Speechless(ServedNetwork):
        def status(self) -> list[Check]:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    bare = serve(Speechless())

    async def bare_scenario(client: httpx.AsyncClient) -> None:
        response = await client.get("/readyz")
        assert response.status_code == 503, response.text
        check = response.json()["checks"]["host network"]
        assert check == {"ok": False, "detail": "PermissionError: [Errno 1] Operation not permitted"}

    bare.run(bare_scenario)


def test_readyz_says_the_store_failed_when_it_cannot_be_read(serve: Callable[..., Served]) -> None:
    served = serve(stop_vms_on_exit=False)

    async def scenario() -> None:
        served.parts.store.close()  # as a store whose file went away or broke would answer: an sqlite3 error
        async with served.client() as client:
            response = await client.get("/readyz")
        assert response.status_code == 503, response.text
        assert response.json()["checks"]["store"]["ok"] is False
        assert "closed database" in response.json()["checks"]["store"]["detail"]
        await served.service.stop()

    asyncio.run(scenario())


def test_openapi_lists_every_v1_route_and_the_docs_load_swagger_from_here(served: Served) -> None:
    expected = {(route.path, method.lower()) for route in served.app.routes
                if isinstance(route, APIRoute) and route.path.startswith("/v1/") for method in route.methods or ()}
    vm_routes = {("/v1/vms", "post"), ("/v1/vms", "get"), ("/v1/vms/{vm_id}", "get"), ("/v1/vms/{vm_id}", "delete"),
                 ("/v1/vms/{vm_id}/console", "get"), ("/v1/vms/{vm_id}/events", "get"),
                 ("/v1/vms/{vm_id}/viewer", "post")}
    assert vm_routes <= expected, vm_routes - expected

    async def scenario(client: httpx.AsyncClient) -> None:
        schema = (await client.get("/openapi.json")).json()
        listed = {(path, method) for path, operations in schema["paths"].items() for method in operations}
        assert expected <= listed, expected - listed
        create = schema["paths"]["/v1/vms"]["post"]
        assert {"202", "401", "413", "422", "429"} <= set(create["responses"])
        assert "WebSocket" not in json.dumps(schema["paths"].get("/v1/vms/{vm_id}/vnc", {}))

        docs = await client.get("/docs")
        assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
        assert '"/swagger/swagger-ui-bundle.js"' in docs.text and '"/swagger/swagger-ui.css"' in docs.text
        assert "cdn." not in docs.text and "unpkg" not in docs.text and "'/openapi.json'" in docs.text
        for asset in ("/swagger/swagger-ui-bundle.js", "/swagger/swagger-ui.css"):
            response = await client.get(asset)
            assert response.status_code == 200 and len(response.content) > 1000, asset

    served.run(scenario)


def test_start_brings_the_host_network_up_and_reconciles(served: Served) -> None:
    orphan = served.insert(VmState.BOOTING, "vm-0000000000dd")  # its creator's gone, no VMM ever ran

    async def scenario(client: httpx.AsyncClient) -> None:
        actions = await served.service.start()
        assert actions[0] == "host network: created bridge br0"
        assert any(action.startswith(f"{orphan.vm_id}: ") and "marked failed" in action for action in actions)
        vm = (await client.get(f"/v1/vms/{orphan.vm_id}")).json()
        assert vm["state"] == "failed" and vm["failure"]["hop"] in ("controller", "vmm.exited")

    served.run(scenario)


# --- the reaper ----------------------------------------------------------------------------------------

def _ready(vm_id: str, created_at: float) -> VmRecord:
    return VmRecord(vm_id=vm_id, user="ann", vcpus=1, mem_mib=1024, directory="", state=VmState.READY,
                    created_at=created_at)


def test_due_for_reaping_after_idle_timeout_or_max_lifetime(serve: Callable[..., Served]) -> None:
    served = serve(idle_timeout=60, max_lifetime=600)
    service = served.service
    now = time.time()
    fresh, idle, old = _ready("vm-fresh", now - 5), _ready("vm-idle", now - 5), _ready("vm-old", now - 700)
    booting = dataclasses.replace(_ready("vm-booting", now - 700), state=VmState.BOOTING)
    failed = dataclasses.replace(_ready("vm-failed", now - 700), state=VmState.FAILED)
    records = [fresh, idle, old, booting, failed]
    assert service.due_for_reaping(records, now) == {
        "vm-old": "reaped: older than the maximum lifetime of 600 s"}
    # No viewer since the VM came up (or the controller started, whichever is later):
    later = now + 61
    assert service.due_for_reaping(records, later) == {
        "vm-fresh": "reaped: no viewer for 60 s", "vm-idle": "reaped: no viewer for 60 s",
        "vm-old": "reaped: older than the maximum lifetime of 600 s"}


def test_only_a_vm_the_pool_marked_is_spared_by_the_reaper_whatever_its_user_is_called(
        serve: Callable[..., Served]) -> None:
    service = serve(idle_timeout=60, max_lifetime=600, pool=1).service
    now = time.time()
    named = dataclasses.replace(_ready("vm-named", now - 700), user="browservm-pool")  # not marked: reaped
    marked = dataclasses.replace(_ready("vm-marked", now - 700), user="browservm-pool", in_pool=True)
    # A pooled VM of a template whose pool is gone (a restart with another --pool) is no pool's to recycle.
    orphan = dataclasses.replace(marked, vm_id="vm-orphan", template="oauth")
    assert service.due_for_reaping([named, marked, orphan], now + 61) == {
        "vm-named": "reaped: older than the maximum lifetime of 600 s",
        "vm-orphan": "reaped: pooled for template 'oauth', which has no pool now"}


def test_a_reaped_vm_ends_released_with_its_reason_in_the_record(serve: Callable[..., Served]) -> None:
    served = serve(idle_timeout=60, max_lifetime=600)

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client)
        records = await served.service.all()
        due = served.service.due_for_reaping(records, time.time() + 61)
        assert due == {vm["vm_id"]: "reaped: no viewer for 60 s"}
        assert await served.service.manager.destroy(vm["vm_id"], ended_reason=due[vm["vm_id"]])
        got = (await client.get(f"/v1/vms/{vm['vm_id']}")).json()
        assert (got["state"], got["ended_reason"], got["pid"]) == ("ended", "reaped: no viewer for 60 s", None)
        assert served.parts.leftovers() == NOTHING
        events = await events_of(client, vm["vm_id"])
        assert events[-1][0] == "ended" and events[-1][1]["reason"] == "reaped: no viewer for 60 s"
        error = error_of(await client.post(f"/v1/vms/{vm['vm_id']}/viewer"), 409)
        assert error["state"] == "ended"
        assert served.service.due_for_reaping(await served.service.all(), time.time() + 10**6) == {}
        assert (await client.delete(f"/v1/vms/{vm['vm_id']}")).json()["removed"] is True
        error_of(await client.get(f"/v1/vms/{vm['vm_id']}"), 404)

    served.run(scenario)
