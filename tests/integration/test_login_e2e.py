"""An OAuth login as a person does it, end to end: `POST /v1/logins {provider: sample}` to a real
`browservm serve`, the `oauth` image booted under QEMU, the sample tool's consent page opened in the
VM's Chromium, the person's approval sent as a real Enter key from noVNC (Debian's Chromium on the
host, driven by Playwright) through the controller's proxy, the credentials captured, sealed in the
vault, handed back equal to what the guest wrote (the agent's console marker, read from the guest's
side), the VM destroyed, and no plaintext of the token left anywhere on the host.

Three ways the login's VM comes: booted cold, restored from the warm pool, and (issue 21) from the
provider's template on a controller whose default template is another image, with a desktop VM of
that default running beside it.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import sync_playwright

from browservm.guest.credentials import credentials_digest
from browservm.guest.markers import parse_marker
from browservm.images.rootfs import RootfsImage
from browservm.vm.pool import POOL_USER
from tests.support.oauth_server import listen
from tests.support.serve_process import sample_provider, serving

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]
CHROMIUM = Path("/usr/bin/chromium")
AUTH_PORT = 18443
_WAIT_S = 600.0
_POOL_S = 900.0  # a snapshot VM's whole boot, then a restore


def _wait_for(client: httpx.Client, login_id: str, states: set[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        login: dict[str, Any] = client.get(f"/v1/logins/{login_id}").json()
        if login["state"] in states:
            return login
        assert login["state"] not in ("failed", "timed-out", "cancelled"), login
        assert time.monotonic() < deadline, f"still {login['state']} after {timeout:g} s: {login}"
        time.sleep(0.5)


def _wait_pooled(client: httpx.Client, timeout: float) -> None:
    """Until the controller's pool holds a ready VM."""
    deadline = time.monotonic() + timeout
    while True:
        vms = client.get("/v1/vms").json()
        if any(vm["user"] == POOL_USER and vm["state"] == "ready" for vm in vms):
            return
        failed = [vm for vm in vms if vm["state"] == "failed"]
        assert not failed, failed
        assert time.monotonic() < deadline, f"no pooled VM ready after {timeout:g} s: {vms}"
        time.sleep(0.5)


@pytest.mark.parametrize("started_from", ["cold", "pooled", "template"])
def test_a_person_approves_in_the_viewer_and_the_controller_keeps_exactly_what_the_tool_wrote(
        oauth_controllers: Controllers, tmp_path: Path, started_from: str, request: pytest.FixtureRequest) -> None:
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (scripts/install.sh installs it)")
    controller = oauth_controllers.open()  # host up, with the auth server's port open to VMs below
    gateway = str(controller.network.plan.segments[0].gateway.ip)
    providers = sample_provider(tmp_path, f"http://{gateway}:{AUTH_PORT}",
                                "oauth" if started_from == "template" else None)
    images = ["--rootfs", str(oauth_controllers.rootfs)]
    if started_from == "template":  # the default is the minimal image; logins take the oauth template's
        templates = tmp_path / "templates.toml"
        templates.write_text(f'[templates.oauth]\nrootfs = "{oauth_controllers.rootfs}"\nmem_mib = 2048\n')
        minimal: RootfsImage = request.getfixturevalue("minimal_image")
        images = ["--rootfs", str(minimal.path), "--templates", str(templates)]
    options = [*images, "--guest-port", str(AUTH_PORT), *(["--pool", "1"] if started_from == "pooled" else [])]
    with serving(oauth_controllers.netns, oauth_controllers.state_dir, oauth_controllers.kernel, options,
                 {"BROWSERVM_PROVIDERS_FILE": str(providers), "BROWSERVM_POOL_VM_MIB": "2048"}) as serve:
        client = serve.client()
        if started_from == "pooled":  # the pool first makes its snapshot, then restores a VM from it
            _wait_pooled(client, _POOL_S)
        with listen(host=gateway, port=AUTH_PORT, netns=controller.network.netns) as server:
            desktop = None
            if started_from == "template":
                desktop = client.post("/v1/vms", json={"user": "e2e"})
                assert desktop.status_code == 202, desktop.text
            started = client.post("/v1/logins", json={"user": "e2e", "provider": "sample", "keep_vm": True})
            assert started.status_code == 202, started.text
            login = started.json()
            vm = client.get(f"/v1/vms/{login['vm_id']}").json()
            assert vm["started_from"] == ("cold" if started_from == "template" else started_from), vm
            if desktop is not None:
                assert vm["template"] == "oauth", vm
                beside = client.get(f"/v1/vms/{desktop.json()['vm_id']}").json()
                assert beside["template"] == "default" and beside["state"] in ("creating", "booting", "ready"), beside
            waiting = _wait_for(client, login["login_id"], {"waiting-for-user"}, _WAIT_S)
            assert waiting["auth_url_host"] == f"{gateway}:{AUTH_PORT}"

            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                                     args=["--no-sandbox", "--disable-gpu"])
                try:
                    page = browser.new_page()
                    page.goto(login["viewer_url"])
                    page.wait_for_selector("#status[data-state='connected']", timeout=120_000)
                    # The consent page has the keyboard in the VM (the opener activated its tab), and its one
                    # button is focused: the person presses Enter, through noVNC and the controller's proxy.
                    page.evaluate("window.browservmRfb.focus()")
                    deadline = time.monotonic() + 120
                    while client.get(f"/v1/logins/{login['login_id']}").json()["state"] == "waiting-for-user":
                        assert time.monotonic() < deadline, "the approval never reached the consent page"
                        page.keyboard.press("Enter")
                        page.wait_for_timeout(3000)
                finally:
                    browser.close()
            captured = _wait_for(client, login["login_id"], {"captured"}, 120)

        sealed = client.get("/v1/users/e2e/credentials/sample")
        assert sealed.status_code == 200, sealed.text
        files = {path: base64.b64decode(data) for path, data in sealed.json()["files"].items()}
        written = json.loads(files["/home/browser/.sample/credentials.json"])
        assert (written["access_token"], written["refresh_token"]) == (server.access_token, server.refresh_token)
        # What the guest itself says it wrote: the agent's marker on the VM's console.
        console = client.get(f"/v1/vms/{captured['vm_id']}/console", params={"lines": 10_000}).json()["lines"]
        markers = [m[1] for line in console if (m := parse_marker(line)) and m[0] == "agent" and "sha256" in m[1]]
        assert markers and markers[-1]["sha256"] == credentials_digest(files) == captured["sha256"]

        assert client.delete(f"/v1/vms/{captured['vm_id']}").json()["removed"]
        if desktop is not None:
            beside = client.get(f"/v1/vms/{desktop.json()['vm_id']}").json()
            assert beside["state"] == "ready", beside  # the desktop VM came up beside the login, of its image
            assert client.delete(f"/v1/vms/{beside['vm_id']}").json()["removed"]
        client.close()

    # Nothing on the host holds the token in the clear: not the state directory (database, logs,
    # consoles, what is left of VM directories), not the controller's output.
    token = server.access_token.encode()
    leaks = [str(path) for path in oauth_controllers.state_dir.rglob("*")
             if path.is_file() and token in path.read_bytes()]
    assert leaks == [] and server.access_token not in "".join(serve.output)
