"""browservm.client against a real served controller: the API (build_app) on uvicorn on 127.0.0.1, its real
service, manager, store and vault, on the fakes of test_api.py (a `sleep` as the VMM, the guest's hops as
gates) and test_logins.py's fake guest agent. The README's example runs here as printed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from browservm.client import AsyncClient, Client, Conflict, InvalidRequest, KeyRefused, LoginFailed, NotFound, VmFailed
from browservm.guest.credentials import credentials_digest
from browservm.vmm import process

from .fakes import NOTHING
from .test_api import KEY, Served, serve_fakes
from .test_logins import FakeAgent, PlannedNetwork, Running, _approve_when_waiting

README = Path(__file__).parents[2] / "README.md"
EXAMPLE_MARK = "<!-- the example: tests/unit/test_client_served.py runs it against a served controller -->"
EXAMPLE_CONNECT = 'URL, KEY = "http://127.0.0.1:8080", open("/var/lib/browservm/api.key").read().strip()'


# What claude-code leaves (providers.toml: its one credentials file, with the key the vault requires).
CLAUDE = {"/home/browser/.claude/.credentials.json": json.dumps({"claudeAiOauth": {"accessToken": "sk-t"}}).encode()}


class ClaudeAgent(FakeAgent):
    """test_logins.py's fake guest agent, its tool claude-code's: it hands over that provider's file."""

    def handle(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        status, answer = super().handle(method, path, body)
        if (method, path, status) == ("POST", "/v1/handover", 200):
            answer = {"files": {p: base64.b64encode(data).decode() for p, data in CLAUDE.items()},
                      "sha256": credentials_digest(CLAUDE)}
        return status, answer


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    fake = ClaudeAgent()
    yield fake
    fake.close()


@pytest.fixture
def running(tmp_path: Path, agent: FakeAgent) -> Iterator[Running]:
    served = serve_fakes(tmp_path / "state", PlannedNetwork())
    logins = served.app.state.logins
    logins.agent_endpoint = agent.endpoint
    logins.poll_s = 0.02
    running = Running(served)
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()
        for vmm in served.parts.driver.alive():
            process.signal_process(vmm, signal.SIGKILL)
        served.parts.store.close()


def readme_example() -> str:
    text = README.read_text()
    found = re.search(re.escape(EXAMPLE_MARK) + r"\n```python\n(.*?)```", text, re.S)
    assert found, "README.md has no example under its mark"
    return found.group(1)


def stopped(running: Running) -> Served:
    """The controller stopped (it destroys its VMs), and nothing of any VM left."""
    running.stop()
    assert running.served.parts.leftovers() == NOTHING
    return running.served


def test_the_readmes_example_runs_as_printed(running: Running, agent: FakeAgent) -> None:
    example = readme_example()
    assert example.count(EXAMPLE_CONNECT) == 1 and len(example.strip().splitlines()) <= 12
    code = example.replace(EXAMPLE_CONNECT, f"URL, KEY = {running.url!r}, {KEY!r}")
    approver = _approve_when_waiting(agent)  # the person signs in, in the viewer
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, str(README), "exec"), {})  # the README's own code, as a reader runs it
    approver.join(5)
    desktop, sign_in, *files = printed.getvalue().splitlines()
    assert re.fullmatch(r"desktop: https://browservm\.example/view/vm-[0-9a-f]{12}\?token=\S+", desktop), desktop
    assert re.fullmatch(r"sign in at: https://browservm\.example/view/vm-[0-9a-f]{12}\?token=\S+", sign_in), sign_in
    assert files == [f"{path} {len(data)} bytes" for path, data in CLAUDE.items()]
    stopped(running)


def test_a_vm_is_created_waited_for_and_its_viewer_link_opens(running: Running) -> None:
    with Client(running.url, api_key=KEY) as bvm:
        made = bvm.create_vm("ann", vcpus=1, mem_mib=512)
        stages: list[str] = []
        vm = bvm.wait_vm(made.vm_id, timeout=30, on_stage=lambda hop, seconds: stages.append(hop))
        assert (made.state, vm.state, vm.mem_mib) == ("creating", "ready", 512) and stages == list(vm.stages)
        viewer = bvm.viewer(vm.vm_id)
        assert viewer.url.startswith(f"https://browservm.example/view/{vm.vm_id}?token={viewer.token}")
        # The link's page state, asked of the controller itself (the public URL is a proxy's in front of it).
        page = f"{running.url}/view/{vm.vm_id}/state"
        state = httpx.get(page, params={"token": viewer.token}, trust_env=False)
        assert state.status_code == 200 and state.json()["state"] == "ready"
        assert [v.vm_id for v in bvm.list_vms()] == [vm.vm_id] and bvm.get_vm(vm.vm_id).state == "ready"
        assert bvm.delete_vm(vm.vm_id) is True and bvm.delete_vm(vm.vm_id) is False
    assert httpx.get(page, params={"token": viewer.token}, trust_env=False).status_code == 404  # gone with the VM
    stopped(running)


def test_a_persistent_profile_through_the_client(running: Running) -> None:
    with Client(running.url, api_key=KEY) as bvm:
        vm = bvm.wait_vm(bvm.create_vm("ann", profile="persistent").vm_id, timeout=30)
        assert vm.profile == "persistent" and "profile.load" in vm.stages
        with pytest.raises(Conflict, match=vm.vm_id):
            bvm.create_vm("ann", profile="persistent")
        assert bvm.profile("ann").in_use_by == vm.vm_id
        with pytest.raises(Conflict):
            bvm.forget_profile("ann")
        bvm.delete_vm(vm.vm_id)
        kept = bvm.profile("ann")
        assert kept.in_use_by is None and kept.size_bytes > 0 and kept.saved_at is not None
        assert bvm.forget_profile("ann") is True and bvm.forget_profile("ann") is False
        with pytest.raises(NotFound):
            bvm.profile("ann")
    stopped(running)


def test_the_controllers_refusals_are_typed(running: Running) -> None:
    running.served.probes.fail["rfb.banner"] = "expected an RFB banner, got nothing"
    with Client(running.url, api_key=KEY) as bvm:
        with pytest.raises(InvalidRequest) as invalid:
            bvm.create_vm("ann", vcpus=99)
        assert (invalid.value.status, invalid.value.field) == (422, "vcpus")
        with pytest.raises(NotFound, match="no VM vm-000000000000"):
            bvm.get_vm("vm-000000000000")
        with pytest.raises(VmFailed) as failed:
            bvm.wait_vm(bvm.create_vm("ann").vm_id, timeout=30)
        assert (failed.value.state, failed.value.hop) == ("failed", "rfb.banner")
        assert failed.value.reason.startswith("expected an RFB banner, got nothing")
    with Client(running.url, api_key="not-the-key") as stranger, pytest.raises(KeyRefused):
        stranger.list_vms()
    stopped(running)


def test_the_async_client_boots_a_vm_and_follows_a_login_that_fails(running: Running, agent: FakeAgent) -> None:
    agent.mode = "fail"

    async def main() -> None:
        async with AsyncClient(running.url, api_key=KEY) as bvm:
            vm = await bvm.wait_vm((await bvm.create_vm("ann")).vm_id, timeout=30)
            assert (await bvm.viewer(vm.vm_id)).url.startswith(f"https://browservm.example/view/{vm.vm_id}?token=")
            assert "sample" in [provider.name for provider in await bvm.providers()]
            started = await bvm.start_login("ann", "sample")
            states: list[str] = []
            with pytest.raises(LoginFailed) as failed:
                await bvm.wait_login(started.login_id, timeout=30, on_change=lambda login: states.append(login.state))
            assert (failed.value.state, failed.value.hop, failed.value.login.exit_status) == ("failed", "tool", 3)
            assert states[0] == "booting" and states[-1] == "failed"
            assert [login.login_id for login in await bvm.list_logins("ann")] == [started.login_id]
            with pytest.raises(NotFound):
                await bvm.credentials("ann", "sample")

    asyncio.run(main())
    stopped(running)
