"""The guest agent in a real VM (the `oauth` image under QEMU/TCG), reached the way the controller reaches it.

One VM: the agent's readiness marker on the console; `GET /v1/status` from the VM network's namespace
answers with the secret from the VM's config disk and 401 without it; then a whole `sample` login
driven over the agent's API alone: the tool in its terminal window on the desktop, the opener
handing the page to the desktop's Chromium, the authorization server (authlib, auto-approving: the
person's key press over VNC is the host side's end-to-end test) on the gateway at a `--guest-port`,
the credentials captured, handed over once and equal to what the server issued, and the console's
`captured` marker carrying the same digest.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from browservm.config import Settings, load_settings
from browservm.guest.agent import PORT
from browservm.guest.credentials import credentials_digest
from browservm.guest.markers import parse_marker
from browservm.images.kernel_build import WITH_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from browservm.vm.state import VmState
from tests.support.agent_client import AgentClient, drive_login, sample_login
from tests.support.oauth_server import listen

from .conftest import TEST_DISK_MIB, Controllers, Namespaces, cleaned_up

pytestmark = [pytest.mark.host, pytest.mark.vm]
AUTH_PORT = 18443  # the test's authorization server, on the gateway: the one port VMs may reach there


class OAuthControllers(Controllers):
    def settings(self, kernel: Path | None = None, vmm: str = "qemu", rootfs: Path | None = None,
                 accel: str = "auto") -> Settings:
        return load_settings(netns=self.netns, state_dir=self.state_dir, kernel=kernel or self.kernel,
                             rootfs=rootfs or self.rootfs, vmm=vmm, max_vms_per_user=8, guest_ports=(AUTH_PORT,),
                             disk_mib=TEST_DISK_MIB, accel=accel)


@pytest.fixture
def controllers(namespaces: Namespaces, tmp_path: Path, built: dict[str, BuiltKernel],
                oauth_image: RootfsImage) -> Iterator[Controllers]:
    with cleaned_up(OAuthControllers(namespaces, tmp_path / "state", built[WITH_IP_PNP.name].vmlinux,
                                     oauth_image.path)) as spaces:
        yield spaces


def _agent_marker(line: str) -> bool:
    marker = parse_marker(line)
    return marker is not None and marker[0] == "ready" and marker[1].get("service") == "agent"


def test_the_agent_answers_the_controller_only_and_runs_a_whole_sample_login(controllers: Controllers) -> None:
    controller = controllers.open()
    manager = controller.manager
    gateway = controller.network.plan.segments[0].gateway.ip
    netns = controller.network.netns
    with listen(host=str(gateway), port=AUTH_PORT, netns=netns, approve="auto") as server:
        record = asyncio.run(manager.create(user="oauth"))
        assert record.state == VmState.READY, record.failure
        console = manager.console(record.vm_id)
        line = asyncio.run(console.wait_for(_agent_marker, 60))
        assert line is not None and "browservm-ready: service=agent state=ready port=7000" in line

        assert record.address is not None
        address = IPv4Address(record.address.split("/")[0])
        secret = manager.secrets(record.vm_id)["agent"]
        client = AgentClient(str(address), PORT, secret, netns=netns, timeout=30)
        assert client.request("GET", "/v1/status", secret=None).status == 401
        assert client.request("GET", "/v1/status", secret="0" * 64).status == 401
        assert client.status()["state"] == "idle"

        started = time.monotonic()
        result = drive_login(client, sample_login(server.issuer, timeout_s=240), 300)
        assert result.status["state"] == "captured", result.status
        assert result.status["auth_url_host"] == f"{gateway}:{AUTH_PORT}"
        took = time.monotonic() - started
        [(path, data)] = result.files.items()
        assert path == "/home/browser/.sample/credentials.json"
        document = json.loads(data)
        assert (document["access_token"], document["refresh_token"]) == (server.access_token, server.refresh_token)
        assert client.request("POST", "/v1/handover").status == 410

        captured = asyncio.run(console.wait_for(lambda text: "browservm-agent: captured" in text, 30))
        assert captured is not None
        fields = (parse_marker(captured) or ("", {}))[1]
        assert fields == {"provider": "sample", "files": "1", "sha256": credentials_digest(result.files)}
        assert not any(server.access_token in text for text in console.tail(10_000))
    print(f"sample login in the VM: {took:.1f} s from POST /v1/login to captured")
