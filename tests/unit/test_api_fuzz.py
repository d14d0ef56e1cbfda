"""Property-based fuzzing of the controller's REST API from its own OpenAPI: whatever a client sends, the
answer is never a 5xx.

Schemathesis generates requests for every operation the app's /openapi.json lists (valid and invalid:
bad types, missing and extra fields, odd path and query strings); each is sent with the operator's key
to the real app around a real service with the fakes of tests/unit/fakes.py, and checked with
`not_a_server_error`. Part of the requests are pointed at VMs that exist, in each state a VM can be in,
with a valid viewer token, so the paths past the 404 are fuzzed too. The WebSocket route is not in
the OpenAPI: hypothesis drives it separately.

The app runs on one event loop of the module's own (an anyio blocking portal), so VMs created by one
request live on for the next, and all are destroyed at the end. Deterministic: a fixed seed,
derandomized hypothesis, no example database.
"""

from __future__ import annotations

import asyncio
import functools
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from browservm.vm.records import Failure, VmRecords
from browservm.vm.state import VmState

from .fakes import NOTHING, stop_all
from .test_api import AUTH, DEADLINE, Served, serve_fakes

SEED = 20261128
MAX_EXAMPLES = 30  # per operation, in the fuzzing phase; the coverage phase adds its own boundary cases
CONFIG = schemathesis.Config.from_dict({
    "seed": SEED,
    "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True, "database": "none"},
})
# The VMs a fuzzed path is pointed at, by the state each is in ("uncleaned": failed, and holding what a
# failed cleanup left).
TARGETS = ("ready", "failed", "ended", "booting", "uncleaned")


_TEXT = st.text(st.characters(codec="utf-8"), max_size=80)
# Where a token carries a number: numerals of Unicode's three kinds, which str.isdecimal, str.isdigit and
# str.isnumeric each take a different share of (int() takes the decimal ones only).
_NUMERALS = st.text(st.characters(categories=["Nd"]) | st.characters(categories=["No"]).filter(str.isdigit)
                    | st.characters(categories=["Nl", "No"]), min_size=1, max_size=4)


@dataclass
class Fuzzed:
    served: Served
    portal: BlockingPortal
    client: httpx.AsyncClient
    vms: dict[str, str] = field(default_factory=dict)  # state -> the id of a VM in that state
    tokens: dict[str, str] = field(default_factory=dict)  # VM id -> a valid viewer token
    seen: dict[str, set[int]] = field(default_factory=dict)  # operation -> statuses answered

    def send(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response: httpx.Response = self.portal.call(_request, self.client, method, url, kwargs)
        return response

    def send_case(self, case: schemathesis.Case[Any]) -> httpx.Response:
        kwargs = case.as_transport_kwargs(base_url="http://test", headers=AUTH)
        # requests' names, as schemathesis serializes a case, to httpx's
        data = kwargs.pop("data", None)
        if isinstance(data, (bytes, str)):
            kwargs["content"] = data
        elif data is not None:
            kwargs["data"] = data
        cookies = kwargs.pop("cookies", None)
        if cookies:
            kwargs.setdefault("headers", {})["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
        # A generated header may hold any Unicode (Idempotency-Key's negative cases): sent as its UTF-8 bytes,
        # which httpx takes as they are (a str it would have to encode as ASCII).
        kwargs["headers"] = {name: value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
                             for name, value in kwargs.get("headers", {}).items()}
        response = self.send(kwargs.pop("method"), kwargs.pop("url"), **kwargs)
        self.seen.setdefault(case.operation.label, set()).add(response.status_code)
        return response


async def _request(client: httpx.AsyncClient, method: str, url: str, kwargs: dict[str, Any]) -> httpx.Response:
    # A deadline, so a request that never ends fails the test instead of stalling it.
    return await asyncio.wait_for(client.request(method, url, **kwargs), DEADLINE)


async def _client(served: Served) -> httpx.AsyncClient:
    return served.client()


async def _stop(fuzzed: Fuzzed) -> None:
    await fuzzed.client.aclose()
    await fuzzed.served.service.stop()  # destroys every VM (stop_vms_on_exit) and ends the manager's tasks


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    # Limits high enough that fuzzed creates are mostly accepted, low enough to bound the `sleep`s started.
    served = serve_fakes(tmp_path_factory.mktemp("fuzz"), max_vms=12, max_vms_per_user=12, idle_timeout=60)
    try:
        with start_blocking_portal() as portal:
            fuzzed = Fuzzed(served, portal, portal.call(_client, served))
            try:
                _make_targets(fuzzed)
                yield fuzzed
            finally:
                portal.call(_stop, fuzzed)
        assert served.parts.leftovers() == NOTHING
    finally:
        stop_all(served.parts)


def _make_targets(fuzzed: Fuzzed) -> None:
    """A VM in each state a path can find one in, and a viewer token for each that can have one."""
    served = fuzzed.served
    for state in ("ready", "failed", "ended"):
        if state == "failed":
            served.probes.fail["net.arp"] = "no ARP reply"
        vm = fuzzed.send("POST", "/v1/vms", params={"wait": True}, json={"user": f"target-{state}"}).json()
        served.probes.fail.clear()
        if state == "ended":
            fuzzed.portal.call(functools.partial(served.service.manager.destroy, vm["vm_id"], ended_reason="reaped"))
        fuzzed.vms[state] = vm["vm_id"]
    booting = served.insert(VmState.BOOTING, "vm-0000000000b0")
    fuzzed.vms["booting"] = booting.vm_id
    fuzzed.vms["uncleaned"] = served.insert(VmState.FAILED, "vm-0000000000f0", Failure(
        hop="guest.network", reason="disabled", hint="look at the console", cleanup=("tap: busy",))).vm_id
    for vm_id in (fuzzed.vms["ready"], booting.vm_id):
        fuzzed.tokens[vm_id] = fuzzed.send("POST", f"/v1/vms/{vm_id}/viewer").json()["token"]
    for state in ("failed", "ended", "uncleaned"):  # tokens issued while these VMs were live
        record = VmRecords(served.parts.store).get(fuzzed.vms[state])
        assert record is not None
        fuzzed.tokens[record.vm_id] = served.service.tokens.issue(record.vm_id, record.viewer_epoch)[0]
    states = {vm["vm_id"]: vm["state"] for vm in fuzzed.send("GET", "/v1/vms").json()}
    assert {states[vm_id] for vm_id in fuzzed.vms.values()} == {"ready", "failed", "ended", "booting"}, states


def _openapi_document() -> dict[str, Any]:
    """The app's OpenAPI, read when the module is collected (the pytest integration needs the operations
    then): from the app around a throwaway service. The served app's own /openapi.json is checked to be
    the same document below."""
    with tempfile.TemporaryDirectory() as state_dir:
        served = serve_fakes(Path(state_dir))
        try:
            return served.app.openapi()
        finally:
            stop_all(served.parts)


OPENAPI = _openapi_document()
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


def test_the_fuzzed_document_is_the_one_the_app_serves(fuzzed: Fuzzed) -> None:
    response = fuzzed.send("GET", "/openapi.json")
    assert response.status_code == 200 and response.json() == OPENAPI


@schema.parametrize()
def test_no_generated_request_gets_a_server_error(case: schemathesis.Case[Any], fuzzed: Fuzzed) -> None:
    """Every phase: the coverage phase's boundary and malformed cases, then hypothesis's fuzzing."""
    response = fuzzed.send_case(case)
    case.validate_response(response, checks=[not_a_server_error])


# Not DELETE: the targets must live for the whole run (deletes are fuzzed with the generated ids above).
about_a_vm = schema.include(path_regex=r"\{vm_id\}").exclude(method="DELETE")


@about_a_vm.given(target=st.sampled_from(TARGETS),
                  expiry=st.one_of(st.none(), _NUMERALS, _TEXT.filter(lambda text: "." not in text)),
                  signature=st.one_of(st.none(), _TEXT.filter(lambda text: "." not in text)))
@about_a_vm.parametrize()
@settings(suppress_health_check=list(HealthCheck))  # each example is a request: slow by hypothesis's measure
def test_no_request_about_an_existing_vm_gets_a_server_error(case: schemathesis.Case[Any], fuzzed: Fuzzed, target: str,
                                                             expiry: str | None, signature: str | None) -> None:
    """The same, with the path pointed at a VM that exists, in each state, and (the viewer's routes) a token
    signed for it: as issued, or with its expiry replaced by `expiry`, its signature by `signature` (any
    Unicode: one that was not ASCII was a 500). (The first test sends tokens of every other kind.)"""
    vm_id = fuzzed.vms[target]
    if target == "booting" and case.operation.path.endswith("/events"):
        vm_id = fuzzed.vms["ready"]  # nothing drives the booting VM: its stream would rightly wait for ever
    case.path_parameters = {**(case.path_parameters or {}), "vm_id": vm_id}
    if case.operation.path.startswith("/view/"):
        token = fuzzed.tokens[vm_id]
        version, token_vm, issued_expiry, issued_signature = token.split(".")
        token = f"{version}.{token_vm}.{issued_expiry if expiry is None else expiry}." \
                f"{issued_signature if signature is None else signature}"
        if case.operation.path.endswith("/token"):  # the renewal takes its token in the body
            case.body = {"token": token}
        else:
            case.query = {**(case.query or {}), "token": token}
    response = fuzzed.send_case(case)
    case.validate_response(response, checks=[not_a_server_error])


_NEEDS_A_LOGIN = re.compile(r"/v1/logins|/v1/users/|/v1/keys/|/v1/webhooks/")


def test_the_fuzzing_reached_past_the_refusals(fuzzed: Fuzzed) -> None:
    """Runs after the fuzzing (same module, in order): each operation answered something besides a 4xx,
    so the generated requests were not all refused at the door."""
    if not fuzzed.seen:
        pytest.skip("the fuzzing test did not run (deselected)")
    assert all(status < 500 for statuses in fuzzed.seen.values() for status in statuses), fuzzed.seen
    refused_only = {label for label, statuses in fuzzed.seen.items() if all(s >= 400 for s in statuses)}
    # A login's, a user's credentials', a key's and a webhook's routes need an id or a provider the fuzzer cannot
    # invent:
    # their refusals (404, 422) are what they should answer it; tests/unit/test_logins.py goes further.
    assert {label for label in refused_only if not _NEEDS_A_LOGIN.search(label)} == set(), fuzzed.seen


# --- the WebSocket route, which the OpenAPI does not list ----------------------------------------------

@pytest.fixture(scope="module")
def websocket_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, TestClient, list[str]]]:
    """A controller with records only (no VMMs: the WebSocket never gets past its checks here)."""
    served = serve_fakes(Path(tmp_path_factory.mktemp("ws")))
    ids = [served.insert(state, f"vm-00000000000{n}").vm_id
           for n, state in enumerate((VmState.BOOTING, VmState.READY, VmState.FAILED, VmState.ENDED))]
    try:
        with TestClient(served.app) as client:
            yield served, client, ids
    finally:
        stop_all(served.parts)


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_the_websocket_answers_any_id_and_token_with_a_refusal_it_explains(
        websocket_served: tuple[Served, TestClient, list[str]], data: st.DataObject) -> None:
    served, client, ids = websocket_served
    # Any id the route's path can carry: no "/" (another path), not "." or ".." (resolved away by the client).
    vm_id = data.draw(st.one_of(st.sampled_from(ids), _TEXT.filter(lambda s: s not in ("", ".", "..")
                                                                        and "/" not in s)), "vm_id")
    token = data.draw(st.one_of(
        _TEXT,
        st.sampled_from(ids).map(lambda i: served.service.tokens.issue(i, "not-its-epoch")[0]),
        st.builds(lambda i, n: f"v1.{i}.{n}.x", st.sampled_from(ids), st.integers(min_value=0, max_value=2**70)),
        st.builds(lambda i, e: f"v1.{i}.{e}.x", st.sampled_from(ids), _NUMERALS | _TEXT.filter(lambda t: "." not in t)),
        # An expiry far off and any signature: one that was not ASCII closed 1011 (issue 18).
        st.builds(lambda i, s: f"v1.{i}.9999999999.{s}", st.sampled_from(ids), _TEXT.filter(lambda t: "." not in t)),
    ), "token")
    path = f"/v1/vms/{quote(vm_id, safe='')}/vnc"
    with client.websocket_connect(path, params={"token": token}) as websocket, \
            pytest.raises(WebSocketDisconnect) as closed:
        websocket.receive_bytes()
    # No token drawn here is valid: a VM that exists refuses it (4401); one that does not is 4404.
    assert closed.value.code == (4401 if vm_id in ids else 4404), (vm_id, token, closed.value.code,
                                                                   closed.value.reason)
    assert closed.value.reason and len(closed.value.reason.encode()) <= 123
    assert served.service._gone == {}  # nothing kept per id tried
