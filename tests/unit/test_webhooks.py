"""Webhooks (issue 21) through the API of a controller with fake VMs (test_api.py's harness), delivered to
a real HTTP receiver on 127.0.0.1 that fails, hangs, and comes back.

What a tenant relies on: each event of the types it asked for arrives once it can, signed so that it
can tell it is ours and fresh; a receiver that is down, slow or dead costs it retries, not the API's
answers or another tenant's deliveries; the bounds hold; what was sent, and what not, can be read back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import httpx
import pytest

from browservm.api.webhook_routes import EventType
from browservm.oauth.records import LoginRecord, LoginRecords
from browservm.store import Store
from browservm.webhooks import BadSignature, sign, verify
from browservm.webhooks.deliverer import PER_TENANT, Deliverer
from browservm.webhooks.events import EVENT_TYPES, LOGIN_EVENTS, MAX_BODY, VM_EVENTS, Event
from browservm.webhooks.records import DROPPED, MAX_PENDING, MAX_WEBHOOKS, WebhookStore

from .fakes import stop_all
from .test_access import bearer, new_key
from .test_api import Served, create, error_of, serve_fakes, until

SECRET = "whsec_test"


# --- a real receiver ----------------------------------------------------------------------------------

@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    answer: str  # what the receiver did: "fail" (500), "hang" (no answer), "ok" (200)
    at: float = dataclasses.field(default_factory=time.monotonic)


class Receiver:
    """An HTTP server on 127.0.0.1: each request gets the next answer of `plan`, then `then`'s."""

    def __init__(self, plan: list[str] | None = None, then: str = "ok", port: int = 0) -> None:
        self.plan = deque(plan or [])
        self.then = then
        self.port = port
        self.requests: list[Received] = []
        self.held = 0  # requests it is not answering, now
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answered(self, answer: str) -> list[Received]:
        return [request for request in self.requests if request.answer == answer]

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()  # a hanging answer ends: its handler returns
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._handlers.add(me)
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            fields = (line.partition(":") for line in head.split("\r\n")[1:] if line)
            headers = {name.strip().lower(): value.strip() for name, _, value in fields}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = self.plan.popleft() if self.plan else self.then
            self.requests.append(Received(headers, body, answer))
            if answer == "hang":
                self.held += 1
                try:
                    await reader.read()  # until the sender gives up and closes
                finally:
                    self.held -= 1
                return
            status = {"ok": "200 OK", "fail": "500 Internal Server Error"}[answer]
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            self._handlers.discard(me)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- the controller --------------------------------------------------------------------------------------

@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """A controller with fake VMs whose deliverer retries fast (settings as keyword arguments); every VMM it
    started is stopped at the end. `state` names a state directory, to serve one again (a restart)."""
    made: list[Served] = []

    def make(state: str | None = None, timeout_s: float = 5.0, **settings: object) -> Served:
        served = serve_fakes(tmp_path / (state or f"state{len(made)}"), None, **settings)
        deliverer: Deliverer = served.app.state.webhooks
        deliverer.timeout_s, deliverer.backoff_s = timeout_s, 0.05
        made.append(served)
        return served

    yield make
    for served in made:
        stop_all(served.parts)


async def add_webhook(client: httpx.AsyncClient, url: str, events: list[str] | None = None,
                      **body: object) -> dict[str, Any]:
    response = await client.post("/v1/webhooks", json={"url": url, "events": events or ["vm.ready"], **body})
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


async def deliveries_of(client: httpx.AsyncClient, webhook_id: str, **params: int) -> dict[str, Any]:
    response = await client.get(f"/v1/webhooks/{webhook_id}/deliveries", params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def until_delivered(client: httpx.AsyncClient, webhook_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The webhook's deliveries once `count` of them are delivered (polled, within test_api's deadline)."""
    found: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15.0
    while sum(delivery["state"] == "delivered" for delivery in found) < count:
        assert loop.time() < deadline, found
        found = (await deliveries_of(client, webhook_id, limit=100))["deliveries"]
        await asyncio.sleep(0.01)
    return found


# --- delivery -----------------------------------------------------------------------------------------------

def test_a_receiver_that_fails_then_hangs_then_comes_back_gets_the_event_once_signed(
        serve: Callable[..., Served]) -> None:
    served = serve(timeout_s=1.0)  # the hanging attempt's cost; a loaded machine still answers within it

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        async with Receiver(["fail", "hang"]) as receiver:
            hook = await add_webhook(client, receiver.url, ["vm.ready", "vm.failed"])
            assert hook["secret"].startswith("whsec_") and hook["tenant"] == ""
            vm = await create(client)
            [delivery] = await until_delivered(client, hook["webhook_id"])
            assert [r.answer for r in receiver.requests] == ["fail", "hang", "ok"]  # once delivered, never again
            assert delivery["attempts"] == 3 and delivery["last_status"] == 200 and delivery["last_error"] == ""
            # Each attempt the same delivery, the same body, each signed afresh with the webhook's secret.
            assert {r.headers["x-browservm-delivery"] for r in receiver.requests} == {str(delivery["id"])}
            assert {r.body for r in receiver.requests} == {receiver.requests[0].body}
            for request in receiver.requests:
                assert request.headers["x-browservm-event"] == "vm.ready"
                assert request.headers["content-type"] == "application/json"
                verify(hook["secret"], request.headers["x-browservm-signature"], request.body)
                with pytest.raises(BadSignature):
                    verify("whsec_another", request.headers["x-browservm-signature"], request.body)
            event = json.loads(receiver.requests[-1].body)
            assert event == delivery["body"]
            assert (event["type"], event["tenant"], event["data"]["vm_id"]) == ("vm.ready", "", vm["vm_id"])
            assert event["data"]["state"] == "ready" and event["id"].startswith("evt-") and event["at"].endswith("Z")
            # The secret was shown once: no listing has it.
            listed = await client.get("/v1/webhooks")
            assert hook["secret"] not in listed.text and listed.json()[0]["webhook_id"] == hook["webhook_id"]

    served.run(scenario)


def test_a_failed_vm_and_the_end_of_a_vm_are_told_to_the_webhooks_that_asked(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        async with Receiver() as ends, Receiver() as failures:
            end_hook = await add_webhook(client, ends.url, ["vm.ended", "vm.destroyed"])
            failure_hook = await add_webhook(client, failures.url, ["vm.failed"])
            served.probes.fail["net.arp"] = "no ARP reply"
            failed = await create(client, user="bob")
            assert failed["state"] == "failed"
            del served.probes.fail["net.arp"]
            ready = await create(client)
            assert (await client.delete(f"/v1/vms/{ready['vm_id']}")).status_code == 200
            await until(lambda: bool(failures.requests), "the failure told")
            told = json.loads(failures.requests[0].body)
            assert (told["type"], told["data"]["vm_id"]) == ("vm.failed", failed["vm_id"])
            assert told["data"]["failure"]["hop"] == "net.arp"
            await until(lambda: any(json.loads(r.body)["data"]["vm_id"] == ready["vm_id"] for r in ends.requests),
                        "the end told")
            types = {json.loads(r.body)["type"] for r in ends.requests}
            assert types <= {"vm.ended", "vm.destroyed"} and types, types
            pages = [await deliveries_of(client, hook["webhook_id"]) for hook in (end_hook, failure_hook)]
            assert all(d["event"] != "vm.ready" for page in pages for d in page["deliveries"])

    served.run(scenario)


def test_a_dead_receiver_holds_up_no_api_request_and_no_other_tenants_deliveries(
        serve: Callable[..., Served]) -> None:
    served = serve(timeout_s=60.0, max_vms=6)  # acme's attempts hang for the whole test

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        acme, beta = (await new_key(client))["key"], (await new_key(client, tenant="beta"))["key"]
        async with Receiver(then="hang") as dead, Receiver() as alive, \
                served.client(bearer(acme)) as a, served.client(bearer(beta)) as b:
            for _ in range(PER_TENANT + 1):
                await add_webhook(a, dead.url)
            beta_hook = await add_webhook(b, alive.url)
            await create(a, user="ann")
            # acme's five deliveries: as many as a tenant may have under way hang, the fifth waits.
            await until(lambda: dead.held == PER_TENANT, "acme's attempts hanging")
            # Meanwhile the API answers, and beta's event is delivered at once.
            started = time.monotonic()
            vm = await create(b, user="bob")
            listed = await a.get("/v1/webhooks")
            assert listed.status_code == 200 and len(listed.json()) == PER_TENANT + 1
            [delivery] = await until_delivered(b, beta_hook["webhook_id"])
            assert delivery["body"]["data"]["vm_id"] == vm["vm_id"]
            print(f"beta: created and delivered in {time.monotonic() - started:.3f} s with acme's receiver dead")
            assert dead.held == PER_TENANT and len(dead.requests) == PER_TENANT  # still hanging, none more

    served.run(scenario)


def test_a_receiver_that_is_down_gets_one_attempt_per_backoff_not_one_per_event(
        serve: Callable[..., Served]) -> None:
    served = serve()
    deliverer: Deliverer = served.app.state.webhooks
    deliverer.backoff_s = 0.3
    events = [Event("vm.ready", "", {"vm_id": f"vm-{n:012}"}) for n in range(50)]

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        async with Receiver(then="fail") as receiver:
            hook = await add_webhook(client, receiver.url)
            for event in events:
                deliverer.emit(event)
            await until(lambda: len(receiver.requests) >= 3, "attempts after the first backoff")
            # However many events wait, the failing receiver got one attempt (two at once, at most) until the
            # backoff passed; each later one is a single probe.
            first = receiver.requests[0].at
            early = [r.at - first for r in receiver.requests if r.at < first + 0.25]
            assert 1 <= len(early) <= 2, early
            page = (await deliveries_of(client, hook["webhook_id"], limit=100))["deliveries"]
            assert len(page) == len(events) and {d["state"] for d in page} == {"pending"}
            receiver.then = "ok"
            delivered = await until_delivered(client, hook["webhook_id"], len(events))
            assert {d["state"] for d in delivered} == {"delivered"}
            assert sorted(json.loads(r.body)["data"]["vm_id"] for r in receiver.answered("ok")) == \
                sorted(event.data["vm_id"] for event in events)

    served.run(scenario)


def test_pending_deliveries_survive_a_restart_of_the_controller(serve: Callable[..., Served]) -> None:
    port = free_port()  # nothing listens on it yet: each attempt is refused
    first = serve("state")

    async def before(client: httpx.AsyncClient) -> dict[str, Any]:
        await first.service.start()
        hook = await add_webhook(client, f"http://127.0.0.1:{port}/hook")
        await create(client)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15.0
        while True:
            [delivery] = (await deliveries_of(client, hook["webhook_id"]))["deliveries"]
            if delivery["attempts"] >= 1:
                break
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        assert delivery["state"] == "pending" and delivery["last_status"] is None
        assert "ConnectError" in delivery["last_error"], delivery
        found: dict[str, Any] = delivery
        return found

    pending = first.run(before)
    stop_all(first.parts)
    again = serve("state")

    async def after(client: httpx.AsyncClient) -> None:
        async with Receiver(port=port) as receiver:
            await again.service.start()
            [hook] = (await client.get("/v1/webhooks")).json()
            delivered = await until_delivered(client, hook["webhook_id"])
            resumed = next(d for d in delivered if d["id"] == pending["id"])
            assert resumed["state"] == "delivered" and resumed["attempts"] >= 2
            assert receiver.requests[0].headers["x-browservm-delivery"] == str(pending["id"])

    again.run(after)


def test_a_login_that_ends_is_told_as_login_failed(serve: Callable[..., Served]) -> None:
    """A login left running by a controller that stopped ends failed at the next start: its webhook hears."""
    served = serve()
    login = LoginRecord(login_id="login-0000000000c1", user="ann", provider="sample", tenant="acme")
    LoginRecords(served.parts.store).insert(login)

    async def scenario(client: httpx.AsyncClient) -> None:
        async with Receiver() as receiver:
            hook = await add_webhook(client, receiver.url, ["login.failed", "login.captured"], tenant="acme")
            await served.service.start()
            [delivery] = await until_delivered(client, hook["webhook_id"])
            event = delivery["body"]
            assert (event["type"], event["tenant"], event["data"]["login_id"]) == ("login.failed", "acme",
                                                                                  login.login_id)
            assert event["data"]["state"] == "failed" and "controller stopped" in event["data"]["reason"]
            verify(hook["secret"], receiver.requests[0].headers["x-browservm-signature"], receiver.requests[0].body)

    served.run(scenario)


# --- the API: scope, bounds, bad input -------------------------------------------------------------------

def test_a_tenant_sees_and_changes_only_its_own_webhooks_and_events(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        acme = (await new_key(client))["key"]
        async with Receiver() as mine, Receiver() as operators, served.client(bearer(acme)) as a:
            own = await add_webhook(a, mine.url)
            assert own["tenant"] == "acme"
            ops = await add_webhook(client, operators.url)  # an admin key's, no tenant: the operator's own events
            assert [hook["webhook_id"] for hook in (await a.get("/v1/webhooks")).json()] == [own["webhook_id"]]
            assert {hook["webhook_id"] for hook in (await client.get("/v1/webhooks")).json()} == \
                {own["webhook_id"], ops["webhook_id"]}
            for method, path in (("GET", "/deliveries"), ("DELETE", ""), ("PATCH", "")):
                answer = await a.request(method, f"/v1/webhooks/{ops['webhook_id']}{path}",
                                         json={"disabled": True} if method == "PATCH" else None)
                assert error_of(answer, 404)["type"] == "WebhookNotFound"
            vm = await create(a, user="ann")
            await until_delivered(a, own["webhook_id"])
            operators_vm = await create(client, user="bob")
            await until_delivered(client, ops["webhook_id"])
            assert [json.loads(r.body)["data"]["vm_id"] for r in mine.requests] == [vm["vm_id"]]
            assert [json.loads(r.body)["data"]["vm_id"] for r in operators.requests] == [operators_vm["vm_id"]]
            # A paused webhook's deliveries wait; resumed, they go.
            paused = await a.patch(f"/v1/webhooks/{own['webhook_id']}", json={"disabled": True})
            assert paused.status_code == 200 and paused.json()["disabled"] is True
            assert (await client.delete(f"/v1/vms/{vm['vm_id']}")).status_code == 200
            await create(a, user="cat")
            waiting = (await deliveries_of(a, own["webhook_id"]))["deliveries"]
            assert [d["state"] for d in waiting] == ["pending", "delivered"] and len(mine.requests) == 1
            assert (await a.patch(f"/v1/webhooks/{own['webhook_id']}", json={"disabled": False})).status_code == 200
            await until_delivered(a, own["webhook_id"], 2)
            # Paged, newest first.
            first = await deliveries_of(a, own["webhook_id"], limit=1)
            rest = await deliveries_of(a, own["webhook_id"], after=first["next"])
            assert [d["id"] for d in first["deliveries"] + rest["deliveries"]] == [d["id"] for d in waiting]
            assert rest["next"] is None
            removed = await a.delete(f"/v1/webhooks/{own['webhook_id']}")
            assert removed.status_code == 200 and removed.json()["webhook_id"] == own["webhook_id"]
            assert error_of(await a.get(f"/v1/webhooks/{own['webhook_id']}/deliveries"), 404)
            audit = (await client.get("/v1/audit", params={"tenant": "acme"})).json()["entries"]
            assert {(e["action"], e["target"]) for e in audit} >= {
                ("POST /v1/webhooks", own["webhook_id"]), ("DELETE /v1/webhooks/{webhook_id}", own["webhook_id"])}

    served.run(scenario)


def test_the_eleventh_webhook_of_a_tenant_is_refused_naming_the_limit(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        hooks = [await add_webhook(client, f"http://10.0.0.{n}/hook", tenant="acme") for n in range(MAX_WEBHOOKS)]
        refused = await client.post("/v1/webhooks", json={"url": "http://10.0.0.99/", "events": ["vm.ready"],
                                                          "tenant": "acme"})
        error = error_of(refused, 429)
        assert error["limit"] == "max_webhooks_per_tenant" and f"has {MAX_WEBHOOKS} webhooks" in error["message"]
        await add_webhook(client, "http://10.0.0.99/", tenant="beta")  # another tenant's count is its own
        assert (await client.delete(f"/v1/webhooks/{hooks[0]['webhook_id']}")).status_code == 200
        await add_webhook(client, "http://10.0.0.99/", tenant="acme")

    served.run(scenario)


def test_the_documented_event_types_are_the_ones_sent() -> None:
    assert set(get_args(EventType)) == set(EVENT_TYPES) == {*VM_EVENTS.values(), *LOGIN_EVENTS.values()}


def test_a_webhooks_secret_is_shown_once_even_to_a_replay(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        body, once = {"url": "http://10.0.0.1/hook", "events": ["vm.ready"]}, {"Idempotency-Key": "hook-1"}
        made = await client.post("/v1/webhooks", json=body, headers=once)
        again = await client.post("/v1/webhooks", json=body, headers=once)
        assert made.status_code == 201 and again.status_code == 409, again.text
        assert made.json()["webhook_id"] in again.json()["error"]["message"] and made.json()["secret"] not in again.text
        assert len((await client.get("/v1/webhooks")).json()) == 1  # made once

    served.run(scenario)


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "ftp://example.com/", "events": ["vm.ready"]}, "url"),
    ({"url": "http:///nohost", "events": ["vm.ready"]}, "url"),
    ({"url": "http://example.com/a b", "events": ["vm.ready"]}, "url"),
    ({"url": "http://example.com:99999/", "events": ["vm.ready"]}, "url"),
    ({"url": "http://example.com/" + "a" * 2048, "events": ["vm.ready"]}, "url"),
    ({"url": "http://example.com/", "events": ["vm.bogus"]}, "events.0"),
    ({"url": "http://example.com/", "events": []}, "events"),
    ({"url": "http://example.com/", "events": ["vm.ready"], "secret": "mine"}, "secret"),
    ({"url": "http://example.com/"}, "events"),
])
def test_a_bad_webhook_is_a_422_naming_the_field_and_makes_nothing(
        serve: Callable[..., Served], body: dict[str, Any], field: str) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        assert error_of(await client.post("/v1/webhooks", json=body), 422)["field"] == field
        assert (await client.get("/v1/webhooks")).json() == []

    served.run(scenario)


# --- the store's bounds, the body's, the signature ------------------------------------------------------

def test_a_flood_fails_the_oldest_pending_deliveries_saying_they_were_dropped(tmp_path: Path) -> None:
    with Store(tmp_path / "state.sqlite3") as store:
        records = WebhookStore(store)
        flooded, _ = records.create("acme", "http://127.0.0.1:9/", ["vm.ready"])
        calm, _ = records.create("beta", "http://127.0.0.1:9/", ["vm.ready"])
        records.record([Event("vm.ready", "beta", {"vm_id": "vm-beta"})], time.time())
        events = [Event("vm.ready", "acme", {"vm_id": f"vm-{n}"}) for n in range(MAX_PENDING + 5)]
        records.record(events[:MAX_PENDING], time.time())
        records.record(events[MAX_PENDING:], time.time())
        pending = store.read("SELECT count(*) FROM deliveries WHERE tenant = 'acme' AND state = 'pending'")[0][0]
        assert pending == MAX_PENDING
        dropped = store.read("SELECT body, last_error FROM deliveries WHERE state = 'failed' ORDER BY id")
        assert [json.loads(str(body))["data"]["vm_id"] for body, _ in dropped] == [f"vm-{n}" for n in range(5)]
        assert {error for _, error in dropped} == {DROPPED} and DROPPED.startswith("dropped: too many pending")
        assert [d.state for d in records.deliveries(calm.webhook_id)] == ["pending"]  # beta's untouched
        # As the API shows them: the oldest page is the dropped ones.
        first = int(str(store.read("SELECT min(id) FROM deliveries WHERE tenant = 'acme'")[0][0]))
        oldest = records.deliveries(flooded.webhook_id, after=first + 5)
        assert [(d.state, d.last_error) for d in oldest] == [("failed", DROPPED)] * 5


def test_a_body_over_the_bound_keeps_only_the_records_identity() -> None:
    event = Event("vm.failed", "acme", {"vm_id": "vm-1", "state": "failed", "user": "ann", "evidence": "x" * MAX_BODY})
    body = json.loads(event.body())
    assert len(event.body()) <= MAX_BODY
    assert body["data"] == {"vm_id": "vm-1", "state": "failed", "user": "ann", "truncated": True}
    assert (body["id"], body["type"], body["tenant"]) == (event.id, "vm.failed", "acme")


def test_verify_refuses_a_changed_body_an_old_or_future_timestamp_and_a_malformed_header() -> None:
    body, now = b'{"type":"vm.ready"}', time.time()
    header = sign(SECRET, body, now)
    assert verify(SECRET, header, body, now=now + 299) == int(now)
    refusals = {
        "a changed body": (header, b'{"type":"vm.failed"}', now),
        "a wrong secret": (sign("whsec_other", body, now), body, now),
        "too old": (header, body, now + 301),
        "from the future": (header, body, now - 301),
        "a new timestamp on an old signature": (header.replace(f"t={int(now)}", f"t={int(now) + 600}"), body,
                                                now + 600),
        "no timestamp": (header.split(",")[1], body, now),
        "no signature": (header.split(",")[0], body, now),
        "malformed": ("garbage", body, now),
    }
    for what, (given, sent, at) in refusals.items():
        with pytest.raises(BadSignature) as refused:
            verify(SECRET, given, sent, now=at)
        assert refused.value.reason, what


def test_stop_before_start_writes_what_was_emitted_and_closes_cleanly(tmp_path: Path) -> None:
    async def main() -> None:
        with Store(tmp_path / "state.sqlite3") as store:
            records = WebhookStore(store)
            hook, _ = records.create("", "http://127.0.0.1:9/", ["vm.ready"])
            deliverer = Deliverer(records)
            deliverer.emit(Event("vm.ready", "", {"vm_id": "vm-1"}))
            await deliverer.stop()
            deliverer.emit(Event("vm.ready", "", {"vm_id": "vm-2"}))  # after stop: not sent, not an error
            assert [d.state for d in records.deliveries(hook.webhook_id)] == ["pending"]

    asyncio.run(main())


def test_the_readmes_receiver_takes_a_signed_delivery_and_refuses_a_changed_one() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### Webhooks"):]
    code = section[section.index("```python\n") + len("```python\n"):section.index("```\n", section.index("```python"))]
    scope: dict[str, Any] = {"SECRET": SECRET}
    exec(compile(code, "README.md (Webhooks)", "exec"), scope)  # the README's own example, as printed
    body = b'{"type":"vm.ready"}'
    assert scope["receive"]({"X-Browservm-Signature": sign(SECRET, body)}, body) == 200
    assert scope["receive"]({"X-Browservm-Signature": sign(SECRET, body)}, body + b" ") == 401
