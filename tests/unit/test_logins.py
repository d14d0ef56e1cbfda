"""The login routes in-process, against a fake agent: a small real HTTP server on 127.0.0.1 that speaks the
agent's contract (DESIGN.md), scripted per test. The app, service, manager, store and vault are the real
ones (test_api.py's served controller: fake host network and guest hops, a `sleep` as the VMM).

Each failure path ends as the issue says: the tool exits non-zero (failed, with its status and output),
the person never approves (timed-out, VM destroyed), a cancel while waiting, the agent gone (failed
naming the hop), the VM dies (failed, vmm.exited). After every test no VM is left.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import signal
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from browservm import cli
from browservm.guest import configdisk
from browservm.guest.credentials import credentials_digest
from browservm.hostnet.netns import NetworkNamespace
from browservm.netplan import NetworkPlan
from browservm.oauth.agent import AgentEndpoint
from browservm.oauth.errors import CatalogError
from browservm.oauth.records import LoginRecords
from browservm.oauth.service import LoginService
from browservm.store import Store
from browservm.vm import hops
from browservm.vm.records import Failure, VmRecord, VmRecords
from browservm.vm.state import VmState
from browservm.vmm import process

from .fakes import NOTHING
from .test_api import DEADLINE, KEY, Served, ServedNetwork, serve_fakes

TOKEN = "sample-access-token-9f8e7d6c5b4a"
REFRESH = "sample-refresh-token-1a2b3c4d5e6f"
PATH = "/home/browser/.sample/credentials.json"
CREDENTIALS = {PATH: json.dumps({"access_token": TOKEN, "refresh_token": REFRESH, "token_type": "Bearer"}).encode()}


class PlannedNetwork(ServedNetwork):
    """The served fake network, with the plan the doctor's routes (api/diagnose.py) read at mount."""

    def __init__(self) -> None:
        super().__init__()
        self.plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")


class FakeAgent:
    """The guest agent's contract on 127.0.0.1, scripted: `mode` says what the tool does after POST /v1/login.

    approve   waiting-for-user at once; `approve()` then makes it captured
    fail      failed with exit status 3 and its output
    time-out  timed out (the tool's own deadline), with its output
    never     waiting-for-user until cancelled
    """

    def __init__(self, mode: str = "approve") -> None:
        self.mode = mode
        self.token = ""
        self.state = "idle"
        self.requests: list[tuple[str, str]] = []
        self.login: dict[str, Any] | None = None
        self.handed_over = False
        self.lock = threading.Lock()
        self.output: list[str] | None = None  # what the tool printed, in place of the usual lines
        self.reason: str | None = None  # why it failed, in place of the usual words
        agent = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if self.headers.get("Authorization") != f"Bearer {agent.token}":
                    self._answer(401, {"error": "unauthorized"})
                    return
                with agent.lock:
                    agent.requests.append((method, self.path))
                    status, answer = agent.handle(method, self.path, body)
                self._answer(status, answer)

            def do_GET(self) -> None:
                self._route("GET")

            def do_POST(self) -> None:
                self._route("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def endpoint(self, record: VmRecord) -> AgentEndpoint:
        """The service's `agent_endpoint`: this agent, holding the VM's own secret from its config disk."""
        self.token = configdisk.read(Path(record.directory) / "config.img")["secrets"]["agent"]
        return AgentEndpoint(NetworkNamespace(None), IPv4Address("127.0.0.1"), self.port)

    def handle(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        if (method, path) == ("GET", "/v1/status"):
            return 200, self.status()
        if (method, path) == ("POST", "/v1/login"):
            if self.state in ("starting", "waiting-for-user"):
                return 409, {"error": "a login is running"}
            self.login = body
            self.state = {"fail": "failed", "time-out": "timed-out"}.get(self.mode, "waiting-for-user")
            return 202, {"state": "starting"}
        if (method, path) == ("POST", "/v1/handover"):
            if self.handed_over:
                return 410, {"error": "handed over already"}
            if self.state != "captured":
                return 409, {"error": "nothing captured"}
            self.handed_over = True
            return 200, {"files": {p: base64.b64encode(d).decode() for p, d in CREDENTIALS.items()},
                         "sha256": credentials_digest(CREDENTIALS)}
        if (method, path) == ("POST", "/v1/cancel"):
            if self.state not in ("starting", "waiting-for-user"):
                return 409, {"state": self.state}
            self.state = "cancelled"
            return 200, {"state": "cancelled"}
        return 404, {"error": "no such route"}

    def status(self) -> dict[str, Any]:
        failed = self.state == "failed"
        # "{agent key}": the first 14 characters of the VM's agent key, known once the service asked.
        output = ["Opening the browser", "error: the issuer answered 500"] if failed else []
        if self.output is not None:
            output = [line.replace("{agent key}", self.token[:14]) for line in self.output]
        return {"state": self.state, "provider": self.login["provider"] if self.login else None,
                "auth_url_host": "issuer.test:9000" if self.state != "idle" else None,
                "exit_status": 3 if failed else None,
                "output": output,
                "reason": self.reason or ("the tool exited before its credentials were there" if failed else None)}

    def approve(self) -> None:
        with self.lock:
            self.state = "captured"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    fake = FakeAgent()
    yield fake
    fake.close()


@pytest.fixture
def logins_served(tmp_path: Path, agent: FakeAgent) -> Iterator[Callable[..., tuple[Served, LoginService]]]:
    made: list[Served] = []

    def make(providers: str | None = None, **settings: object) -> tuple[Served, LoginService]:
        if providers is not None:
            path = tmp_path / f"providers{len(made)}.toml"
            path.write_text(providers)
            settings["providers_file"] = path
        served = serve_fakes(tmp_path / f"state{len(made)}", PlannedNetwork(), **settings)
        made.append(served)
        logins: LoginService = served.app.state.logins
        logins.agent_endpoint = agent.endpoint
        logins.poll_s = 0.02
        return served, logins

    yield make
    for served in made:
        for vmm in served.parts.driver.alive():
            process.signal_process(vmm, signal.SIGKILL)
        served.parts.store.close()


async def wait_state(client: httpx.AsyncClient, login_id: str, *states: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while True:
        response = await client.get(f"/v1/logins/{login_id}")
        assert response.status_code == 200, response.text
        login: dict[str, Any] = response.json()
        if login["state"] in states:
            return login
        assert loop.time() < deadline, f"not {states} within {DEADLINE} s: {login}"
        await asyncio.sleep(0.01)


async def post_login(client: httpx.AsyncClient, **body: object) -> dict[str, Any]:
    response = await client.post("/v1/logins", json={"user": "ann", "provider": "sample", **body})
    assert response.status_code == 202, response.text
    started: dict[str, Any] = response.json()
    return started


def test_a_login_is_captured_sealed_handed_back_and_its_vm_destroyed(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, logins = logins_served()

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        assert started["state"] == "booting" and started["vm_id"].startswith("vm-")
        assert started["viewer_url"].startswith(f"https://browservm.example/view/{started['vm_id']}?token=")
        login_id = started["login_id"]
        waiting = await wait_state(client, login_id, "waiting-for-user")
        assert waiting["auth_url_host"] == "issuer.test:9000"
        assert agent.login == logins.catalog.get("sample").agent_request()
        agent.approve()
        captured = await wait_state(client, login_id, "captured")
        assert captured["files"] == 1 and captured["sha256"] == credentials_digest(CREDENTIALS)
        assert list(captured["states"]) == ["booting", "starting", "waiting-for-user", "captured"]
        await wait_state_destroyed(client, login_id)
        assert (await client.get(f"/v1/vms/{started['vm_id']}")).status_code == 404
        response = await client.get("/v1/users/ann/credentials/sample")
        assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
        stored = response.json()
        assert {p: base64.b64decode(d) for p, d in stored["files"].items()} == CREDENTIALS
        assert stored["login_id"] == login_id
        events = await client.get(f"/v1/logins/{login_id}/events")
        assert [line.split(": ", 1)[1] for line in events.text.splitlines() if line.startswith("event:")][-1] \
            == "captured"
        assert agent.handed_over and ("POST", "/v1/handover") in agent.requests
        listed = (await client.get("/v1/logins", params={"user": "ann"})).json()
        assert [login["login_id"] for login in listed] == [login_id]
        assert (await client.delete("/v1/users/ann/credentials/sample")).json()["removed"] is True
        assert (await client.get("/v1/users/ann/credentials/sample")).status_code == 404
        assert (await client.delete("/v1/users/ann/credentials/sample")).json()["removed"] is False

    served.run(scenario)
    state_dir = served.service.settings.state_dir
    for path in state_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert TOKEN.encode() not in data and REFRESH.encode() not in data, path


async def wait_state_destroyed(client: httpx.AsyncClient, login_id: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not (await client.get(f"/v1/logins/{login_id}")).json()["vm_destroyed"]:
        assert loop.time() < deadline, "the login's VM was not destroyed"
        await asyncio.sleep(0.01)


def test_a_tool_that_exits_non_zero_fails_the_login_with_its_status_and_output(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "fail"

    async def scenario(client: httpx.AsyncClient) -> None:
        login = await wait_state(client, (await post_login(client))["login_id"], "failed")
        assert login["hop"] == "tool" and login["exit_status"] == 3
        assert "the tool exited with status 3" in login["reason"]
        assert login["output"] == ["Opening the browser", "error: the issuer answered 500"]
        await wait_state_destroyed(client, login["login_id"])
        assert (await client.get("/v1/users/ann/credentials/sample")).status_code == 404

    served.run(scenario)


# A JWT-shaped token the controller never saw (the tool could not write it), and a plain line.
UNSEEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbm4ifQ.c2lnbmF0dXJlLW9mLTQ4LWJ5dGVz"


def test_what_a_failed_or_timed_out_tool_printed_is_kept_without_any_credential(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    """Issue 18 #7: a failed or timed-out login stored the tool's output unredacted."""
    served, _ = logins_served()
    agent.output = ["Opening the browser", f"refreshing with {UNSEEN}", "agent key {agent key}…",
                    "  at /usr/local/lib/node_modules/@sample/cli/dist/main.js:12:7"]
    agent.reason = f"could not write the token {UNSEEN}"

    async def scenario(client: httpx.AsyncClient) -> None:
        for mode, end in (("fail", "failed"), ("time-out", "timed-out")):
            agent.mode, agent.state, agent.login = mode, "idle", None
            login = await wait_state(client, (await post_login(client))["login_id"], end)
            assert login["output"] == ["Opening the browser", "refreshing with [redacted]",
                                       "[redacted: it held a credential]",
                                       "  at /usr/local/lib/node_modules/@sample/cli/dist/main.js:12:7"], mode
            assert UNSEEN not in login["reason"] and "could not write the token [redacted]" in login["reason"]
            await wait_state_destroyed(client, login["login_id"])

    served.run(scenario)


def test_a_captured_logins_output_drops_every_line_sharing_a_piece_of_a_credential(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    """The old redaction dropped only lines holding a whole credential word: a prefix stayed."""
    served, _ = logins_served()

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        await wait_state(client, started["login_id"], "waiting-for-user")
        agent.output = ["Logged in", f"token: {TOKEN[:13]}…", f"refresh …{REFRESH[-12:]}", "token_type Bearer"]
        agent.approve()
        login = await wait_state(client, started["login_id"], "captured")
        assert login["output"] == ["Logged in", "[redacted: it held a credential]",
                                   "[redacted: it held a credential]", "token_type Bearer"]

    served.run(scenario)


def test_a_person_who_never_approves_times_out_and_the_vm_is_destroyed(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served(providers="[providers.sample]\ntimeout_s = 1\n")
    agent.mode = "never"

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        login = await wait_state(client, started["login_id"], "timed-out")
        assert "within the provider's 1 s" in login["reason"] and login["hop"] is None
        assert ("POST", "/v1/cancel") in agent.requests  # the tool was stopped
        await wait_state_destroyed(client, login["login_id"])
        assert (await client.get(f"/v1/vms/{started['vm_id']}")).status_code == 404

    served.run(scenario)


def test_cancel_while_waiting_stops_the_tool_and_destroys_the_vm(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "never"

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        await wait_state(client, started["login_id"], "waiting-for-user")
        response = await client.delete(f"/v1/logins/{started['login_id']}")
        assert response.status_code == 200, response.text
        assert response.json()["cancelled"] is True and response.json()["login"]["state"] == "cancelled"
        assert ("POST", "/v1/cancel") in agent.requests and agent.state == "cancelled"
        await wait_state_destroyed(client, started["login_id"])
        again = await client.delete(f"/v1/logins/{started['login_id']}")
        assert again.json()["cancelled"] is False and again.json()["login"]["state"] == "cancelled"

    served.run(scenario)


def test_the_agent_gone_fails_the_login_naming_the_hop(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "never"

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        await wait_state(client, started["login_id"], "waiting-for-user")
        agent.close()  # the agent is killed in the guest: nothing listens on its port any more
        login = await wait_state(client, started["login_id"], "failed")
        assert login["hop"] == "agent.connect" and "Connection refused" in login["reason"]
        await wait_state_destroyed(client, started["login_id"])

    served.run(scenario)


def test_an_agent_that_never_answers_fails_with_the_hop_and_says_the_image_has_none(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, logins = logins_served()
    logins.agent_wait_s = 0.5
    agent.close()

    async def scenario(client: httpx.AsyncClient) -> None:
        login = await wait_state(client, (await post_login(client))["login_id"], "failed")
        assert login["hop"] == "agent.connect" and "carries no OAuth agent" in login["reason"]
        assert login["states"].keys() == {"booting", "failed"}

    served.run(scenario)


def test_a_vm_that_dies_fails_the_login(logins_served: Callable[..., tuple[Served, LoginService]],
                                        agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "never"

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client)
        await wait_state(client, started["login_id"], "waiting-for-user")
        for vmm in served.parts.driver.alive():
            process.signal_process(vmm, signal.SIGKILL)  # the VMM dies; the agent (here) still answers
        login = await wait_state(client, started["login_id"], "failed")
        assert login["hop"] == "vmm.exited" and "the VMM process exited" in login["reason"], login

    served.run(scenario)


def test_a_wrong_agent_key_fails_with_agent_auth(logins_served: Callable[..., tuple[Served, LoginService]],
                                                 agent: FakeAgent) -> None:
    served, logins = logins_served()

    def wrong(record: VmRecord) -> AgentEndpoint:
        endpoint = agent.endpoint(record)
        agent.token = "0" * 64  # another VM's agent
        return endpoint
    logins.agent_endpoint = wrong

    async def scenario(client: httpx.AsyncClient) -> None:
        login = await wait_state(client, (await post_login(client))["login_id"], "failed")
        assert login["hop"] == "agent.auth"

    served.run(scenario)


def test_keep_vm_and_a_given_vm(logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served()

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = (await client.post("/v1/vms", params={"wait": True}, json={"user": "ann"})).json()
        started = await post_login(client, vm_id=vm["vm_id"], keep_vm=True)
        assert started["vm_id"] == vm["vm_id"]
        await wait_state(client, started["login_id"], "waiting-for-user")
        agent.approve()
        login = await wait_state(client, started["login_id"], "captured")
        assert not login["vm_destroyed"] and login["keep_vm"]
        assert (await client.get(f"/v1/vms/{vm['vm_id']}")).json()["state"] == "ready"
        other = await client.post("/v1/logins", json={"user": "bob", "provider": "sample", "vm_id": vm["vm_id"]})
        assert other.status_code == 422 and other.json()["error"]["field"] == "vm_id"

    served.run(scenario)


def test_a_given_vm_booting_in_another_process_is_followed_to_its_failure(
        logins_served: Callable[..., tuple[Served, LoginService]]) -> None:
    served, _ = logins_served()
    record = served.insert(VmState.BOOTING)  # as the CLI would have it, creating it in its own process

    async def scenario(client: httpx.AsyncClient) -> None:
        started = await post_login(client, vm_id=record.vm_id, keep_vm=True)
        assert (await client.get(f"/v1/logins/{started['login_id']}")).json()["state"] == "booting"
        # That process writes its outcome through a connection of its own; the login learns it from the store.
        other = Store(served.parts.store.path)
        try:
            failed = dataclasses.replace(record, state=VmState.FAILED,
                                         failure=Failure(hops.GUEST_NETWORK, "no DHCP lease within 30 s", ""))
            await asyncio.to_thread(VmRecords(other).save, failed)
        finally:
            other.close()
        login = await wait_state(client, started["login_id"], "failed")
        assert login["hop"] == hops.GUEST_NETWORK and "no DHCP lease within 30 s" in login["reason"]

    served.run(scenario)


def test_one_running_login_per_user_and_provider(logins_served: Callable[..., tuple[Served, LoginService]],
                                                 agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "never"

    async def scenario(client: httpx.AsyncClient) -> None:
        first = await post_login(client)
        second = await client.post("/v1/logins", json={"user": "ann", "provider": "sample"})
        assert second.status_code == 409, second.text
        assert first["login_id"] in second.json()["error"]["message"]
        assert second.json()["error"]["type"] == "LoginRunning"
        await client.delete(f"/v1/logins/{first['login_id']}")
        await wait_state_destroyed(client, first["login_id"])

    served.run(scenario)


def test_bad_requests_are_refused_with_the_one_error_shape(
        logins_served: Callable[..., tuple[Served, LoginService]]) -> None:
    served, _ = logins_served()

    async def scenario(client: httpx.AsyncClient) -> None:
        unknown = await client.post("/v1/logins", json={"user": "ann", "provider": "nope"})
        assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "provider"
        for body, field in (({"user": "ann"}, "provider"), ({"user": "", "provider": "sample"}, "user"),
                            ({"user": "ann", "provider": "sample", "keep_vm": "yes"}, "keep_vm"),
                            ({"user": "ann", "provider": "sample", "vm_id": "../x"}, "vm_id"),
                            ({"user": "ann", "provider": "sample", "extra": 1}, "extra")):
            response = await client.post("/v1/logins", json=body)
            assert response.status_code == 422 and response.json()["error"]["field"] == field, response.text
        missing = await client.post("/v1/logins", json={"user": "ann", "provider": "sample",
                                                        "vm_id": "vm-0123456789ab"})
        assert missing.status_code == 404
        assert (await client.get("/v1/logins/login-0123456789ab")).status_code == 404
        assert (await client.get("/v1/logins/login-nope")).status_code == 422
        assert (await client.get("/v1/logins/login-0123456789ab/events")).status_code == 404
        assert (await client.get("/v1/users/ann/credentials/codex")).status_code == 404
        async with served.client(headers={}) as anonymous:
            for method, path in (("POST", "/v1/logins"), ("GET", "/v1/logins"), ("GET", "/v1/providers"),
                                 ("GET", "/v1/users/ann/credentials/sample"),
                                 ("DELETE", "/v1/users/ann/credentials/sample")):
                response = await anonymous.request(method, path, json={"user": "ann", "provider": "sample"})
                assert response.status_code == 401, (method, path)
        providers = (await client.get("/v1/providers")).json()
        assert [p["name"] for p in providers] == ["claude-code", "codex", "gemini-cli", "sample"]

    served.run(scenario)


def test_a_controller_that_stops_ends_running_logins_and_their_vms(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent) -> None:
    served, _ = logins_served()
    agent.mode = "never"
    login_id = ""

    async def scenario(client: httpx.AsyncClient) -> None:
        nonlocal login_id
        login_id = (await post_login(client))["login_id"]
        await wait_state(client, login_id, "waiting-for-user")

    served.run(scenario)  # stops the service at the end
    record = LoginRecords(served.parts.store).get(login_id)
    assert record is not None and record.state.value == "failed" and record.hop == "controller"
    assert record.vm_destroyed


def test_a_bad_catalog_stops_the_controller_at_its_start(tmp_path: Path) -> None:
    path = tmp_path / "providers.toml"
    path.write_text("[providers.codex]\ntimeout_s = -1\n")
    with pytest.raises(Exception, match=r"provider 'codex', field 'timeout_s'"):
        serve_fakes(tmp_path / "state", PlannedNetwork(), providers_file=path)



# --- the CLI against a real server -----------------------------------------------------------------

class Running:
    """The served app on uvicorn, on 127.0.0.1 in a thread of its own (its own event loop); the service stops
    on that loop when the server does."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.server = uvicorn.Server(uvicorn.Config(served.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            threading.Event().wait(0.01)
        assert self.server.started
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def _main(self) -> None:
        try:
            await self.server.serve()
        finally:
            await self.served.service.stop()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def _approve_when_waiting(agent: FakeAgent, seen: Callable[[], bool] = lambda: True) -> threading.Thread:
    """Approve once the agent waits for the person and `seen()` says the controller noticed it (a person
    approves what the viewer shows, never faster than the controller's poll)."""
    def approve() -> None:
        for _ in range(1500):
            if agent.state == "waiting-for-user" and seen():
                agent.approve()
                return
            threading.Event().wait(0.01)
    thread = threading.Thread(target=approve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("mode", ["approve", "fail"])
def test_cli_login_prints_the_viewer_and_each_state_and_exits_by_the_outcome(
        logins_served: Callable[..., tuple[Served, LoginService]], agent: FakeAgent, mode: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    served, _ = logins_served()
    agent.mode = mode
    running = Running(served)
    monkeypatch.setenv("BROWSERVM_API_KEY", KEY)
    try:
        def controller_saw_it() -> bool:
            listed = httpx.get(f"{running.url}/v1/logins", headers={"Authorization": f"Bearer {KEY}"},
                               timeout=5, trust_env=False).json()
            return any(login["state"] == "waiting-for-user" for login in listed)
        approver = _approve_when_waiting(agent, controller_saw_it)
        code = cli.main(["login", "sample", "--user", "ann", "--url", running.url,
                         "--state-dir", str(served.service.settings.state_dir)])
        approver.join(1)
    finally:
        running.stop()
    out, err = capsys.readouterr()
    assert "viewer     https://browservm.example/view/vm-" in out
    if mode == "approve":
        assert code == 0, err
        assert "waiting-for-user" in err and "sign in at issuer.test:9000 in the viewer" in err
        assert "captured: 1 file(s), sha256 " + credentials_digest(CREDENTIALS) in out
    else:
        assert code == 1
        assert "browservm: login failed at tool: the tool exited with status 3" in err
        assert "  | error: the issuer answered 500" in err
    assert TOKEN not in out + err
    assert served.parts.leftovers() == NOTHING


# --- templates (issue 21): a login's VM is made from its provider's template ---------------------------

def test_a_login_uses_its_providers_template(
        tmp_path: Path, logins_served: Callable[..., tuple[Served, LoginService]]) -> None:
    path = tmp_path / "templates.toml"
    path.write_text('[templates.oauth]\nimage_profile = "oauth"\nmem_mib = 2048\n')
    providers = '[providers.sample]\ntemplate = "oauth"\n'
    served, logins = logins_served(providers, templates=path)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/logins", json={"user": "ann", "provider": "sample"})
        assert response.status_code == 202, response.text
        vm = (await client.get(f"/v1/vms/{response.json()['vm_id']}")).json()
        assert (vm["template"], vm["mem_mib"]) == ("oauth", 2048)
        await logins.cancel(response.json()["login_id"])

    served.run(scenario)


def test_a_login_without_a_template_keeps_todays_vm(logins_served: Callable[..., tuple[Served, LoginService]]) -> None:
    served, logins = logins_served(login_mem_mib=1280)

    async def scenario(client: httpx.AsyncClient) -> None:
        response = await client.post("/v1/logins", json={"user": "ann", "provider": "sample"})
        assert response.status_code == 202, response.text
        vm = (await client.get(f"/v1/vms/{response.json()['vm_id']}")).json()
        assert (vm["template"], vm["mem_mib"]) == ("default", 1280)
        await logins.cancel(response.json()["login_id"])

    served.run(scenario)


def test_a_provider_naming_an_unknown_template_stops_the_controller_at_its_start(
        logins_served: Callable[..., tuple[Served, LoginService]]) -> None:
    with pytest.raises(CatalogError) as excinfo:
        logins_served('[providers.sample]\ntemplate = "nosuch"\n')
    assert (excinfo.value.provider, excinfo.value.field) == ("sample", "template")
    assert "no such template" in excinfo.value.reason
