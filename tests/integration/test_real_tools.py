"""The three real login tools, started by the agent in one booted `oauth` VM that has no internet.

Each provider's shipped catalog entry goes to the VM's agent exactly as the controller sends it
(`Provider.agent_request()`), so what runs is the pinned npm package baked into the image, in its
terminal window on the desktop, as the desktop user. The VM's network reaches nothing (no uplink, no
guest port open on the gateway). Offline, each of the three packages still builds its authorization
URL, opens its loopback callback listener and calls the browser (checked against the installed
packages: see providers.toml), so each must reach `waiting-for-user` with the URL's host that of the
provider's real authorization page, within the catalog's timeout (the agent's own deadline ends a tool
that sits at a prompt as `timed-out`: never a hang), and stop when cancelled. A tool that fails says
why in its own words: its last lines are in the assertion's message.

The agent reports the URL's host, not the callback listener; where the tool itself says that it
listens (codex), that line is checked as well.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from browservm.guest.agent import PORT
from browservm.guest.markers import parse_marker
from browservm.images.kernel_build import WITH_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from browservm.oauth.catalog import load_catalog
from browservm.vm.state import VmState
from tests.support.agent_client import FINAL_STATES, AgentClient

from .conftest import Controllers, Namespaces

pytestmark = [pytest.mark.host, pytest.mark.vm]


@dataclass(frozen=True)
class Expected:
    auth_host: str  # the authorization page each package opens (its own URL, not the link it prints)
    says: str | None  # a line the tool prints once it waits for the callback, where it prints one


EXPECTED = {
    "claude-code": Expected("claude.com", "Opening browser to sign in"),
    "codex": Expected("auth.openai.com", "Starting local login server on http://localhost:1455"),
    "gemini-cli": Expected("accounts.google.com", None),  # --acp prints nothing on its terminal
}


def _agent_ready(line: str) -> bool:
    marker = parse_marker(line)
    return marker is not None and marker[0] == "ready" and marker[1].get("service") == "agent"


@pytest.fixture(scope="module")
def agent(built: dict[str, BuiltKernel], oauth_image: RootfsImage,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentClient]:
    """One VM for the three tools, one after the other: each test cancels its login before the next starts."""
    spaces = Namespaces()
    state_dir: Path = tmp_path_factory.mktemp("real-tools") / "state"
    controllers = Controllers(spaces, state_dir, built[WITH_IP_PNP.name].vmlinux, oauth_image.path)
    try:
        controller = controllers.open()
        manager, netns = controller.manager, controller.network.netns
        record = asyncio.run(manager.create(user="tools"))
        assert record.state == VmState.READY, record.failure
        assert asyncio.run(manager.console(record.vm_id).wait_for(_agent_ready, 60)) is not None
        assert record.address is not None
        client = AgentClient(record.address.split("/")[0], PORT, manager.secrets(record.vm_id)["agent"],
                             netns=netns, timeout=30)
        assert client.status()["state"] == "idle"
        yield client
    finally:
        try:
            controllers.cleanup()
        finally:
            spaces.cleanup()


@pytest.mark.parametrize("provider_name", sorted(EXPECTED))
def test_the_tool_opens_its_providers_page_offline_and_stops_when_cancelled(agent: AgentClient,
                                                                           provider_name: str) -> None:
    provider = load_catalog().get(provider_name)
    expected = EXPECTED[provider_name]
    answer = agent.request("POST", "/v1/login", provider.agent_request())
    assert answer.status == 202, answer
    try:
        status = agent.wait_for({"waiting-for-user"}, provider.timeout_s + 30)
        assert status["state"] == "waiting-for-user", (
            f"{provider_name} ended {status['state']} (exit status {status['exit_status']}): {status['reason']}; "
            "it said:\n" + "\n".join(status["output"]))
        assert status["provider"] == provider_name
        assert status["auth_url_host"] == expected.auth_host, status
        if expected.says is not None:
            assert any(expected.says in line for line in status["output"]), status["output"]
        # Still waiting a moment later: the tool sits at its listener, it did not open the page and exit.
        assert agent.status()["state"] == "waiting-for-user"
    finally:
        if agent.status()["state"] not in FINAL_STATES:
            cancelled = agent.request("POST", "/v1/cancel")
            assert cancelled.status == 200 and cancelled.body["state"] == "cancelled", cancelled
