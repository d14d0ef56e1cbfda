"""A viewer link that lasts as long as the session it opens (issue 22): an open viewer trades its still
valid token for the next one, a reload within the session works, a link nobody opens still expires, and
no token outlives its VM. The toolbar's state, time left and clipboard policy come from the VM's state.

The API half runs on test_api.py's served controller (fake VMM, a clock the test moves); the page half in
Debian's Chromium against the real app on uvicorn on loopback (the fake VM has no desktop: the page's
desktop connection is refused, which is no matter for its link)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from playwright.sync_api import expect

from browservm.api.app import build_app
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.hostnet.host import HostNetwork
from browservm.templates import templates_for
from browservm.vm.parts import Limits
from browservm.vm.records import VmRecords
from browservm.vm.state import VmState
from tests.support.browsers import chromium, served_in_thread

from .fakes import NOTHING, FakeProbes, make_parts, stop_all
from .test_api import Served, error_of

DEADLINE = 30.0


async def ready_vm(client: httpx.AsyncClient, **body: object) -> dict[str, Any]:
    response = await client.post("/v1/vms", params={"wait": "true"}, json={"user": "ann", **body})
    assert response.status_code == 200, response.text
    made: dict[str, Any] = response.json()
    return made


def test_an_open_viewer_trades_its_valid_token_for_the_next_and_none_outlives_its_vm(
        serve: Callable[..., Served]) -> None:
    served = serve(viewer_ttl=600)
    clock = served.clock

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await ready_vm(client)
        vm_id = vm["vm_id"]
        first = (await client.post(f"/v1/vms/{vm_id}/viewer")).json()
        async with served.client(headers={}) as page:  # the viewer page has no key, only its token
            clock.now += 500
            renewed = await page.post(f"/view/{vm_id}/token", json={"token": first["token"]})
            assert renewed.status_code == 200, renewed.text
            second = renewed.json()
            assert second["token"] != first["token"] and second["expires_at"] == int(clock.now + 600)
            assert second["url"].endswith(f"/view/{vm_id}?token={second['token']}")

            clock.now += 200  # the first link's time is over; the session's is not
            assert "expired" in error_of(await page.post(f"/view/{vm_id}/token", json={"token": first["token"]}),
                                         401)["message"]
            assert (await page.get(f"/view/{vm_id}/state", params={"token": first["token"]})).status_code == 401
            state = await page.get(f"/view/{vm_id}/state", params={"token": second["token"]})
            assert state.status_code == 200, state.text
            assert state.json()["clipboard"] == {"paste": True, "copy": True}
            assert state.json()["expires_at"] == pytest.approx(vm["expires_at"])

            # Not a token of ours, too long, an unknown field, another VM's: each refused and named.
            forged = f"v1.{vm_id}.{int(clock.now) + 600}.forged"
            assert error_of(await page.post(f"/view/{vm_id}/token", json={"token": forged}), 401)
            assert error_of(await page.post(f"/view/{vm_id}/token", json={"token": "x" * 257}), 422)
            assert error_of(await page.post(f"/view/{vm_id}/token", json={"token": second["token"], "ttl": 1}), 422)
            other = "vm-0000000000ff"
            assert error_of(await page.post(f"/view/{other}/token", json={"token": second["token"]}), 404)

            # A VM that ends takes its links with it: the next trade is refused, whatever the token's time.
            assert (await client.delete(f"/v1/vms/{vm_id}")).status_code in (200, 202, 204)
            assert error_of(await page.post(f"/view/{vm_id}/token", json={"token": second["token"]}), 404)

    served.run(scenario)


def test_no_link_outlives_its_vm_and_a_vm_that_failed_gives_none(serve: Callable[..., Served]) -> None:
    served = serve(viewer_ttl=3600)

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await ready_vm(client, timeout_s=120)
        link = (await client.post(f"/v1/vms/{vm['vm_id']}/viewer")).json()
        assert link["expires_at"] == int(vm["expires_at"])  # 120 s, not the hour of viewer_ttl
        renewed = await client.post(f"/view/{vm['vm_id']}/token", json={"token": link["token"]})
        assert renewed.json()["expires_at"] == int(vm["expires_at"])
        failed = served.insert(VmState.FAILED, "vm-00000000000f")
        token, _ = served.service.tokens.issue(failed.vm_id, failed.viewer_epoch)
        assert error_of(await client.post(f"/view/{failed.vm_id}/token", json={"token": token}), 409)

    served.run(scenario)


def test_the_toolbar_is_told_its_vms_clipboard_policy(serve: Callable[..., Served], tmp_path: Path) -> None:
    templates = tmp_path / "templates.toml"
    templates.write_text('[templates.kiosk]\nclipboard = "copy"\n')
    served = serve(templates=templates)

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await ready_vm(client, template="kiosk")
        token = (await client.post(f"/v1/vms/{vm['vm_id']}/viewer")).json()["token"]
        state = (await client.get(f"/view/{vm['vm_id']}/state", params={"token": token})).json()
        assert state["clipboard"] == {"paste": False, "copy": True}
        listed = {t["name"]: t["clipboard"] for t in (await client.get("/v1/templates")).json()}
        assert listed == {"default": "both", "kiosk": "copy"}
        record = VmRecords(served.parts.store).get(vm["vm_id"])
        assert record is not None and await served.service.clipboard_of(record) == (False, True)  # the proxy's

    served.run(scenario)


def test_a_tenant_allows_its_viewers_clipboard_one_way_over_its_templates(serve: Callable[..., Served],
                                                                           tmp_path: Path) -> None:
    templates = tmp_path / "templates.toml"
    templates.write_text('[templates.kiosk]\nclipboard = "copy"\n')
    served = serve(templates=templates)

    async def policy(client: httpx.AsyncClient, vm: dict[str, Any]) -> dict[str, bool]:
        token = (await client.post(f"/v1/vms/{vm['vm_id']}/viewer")).json()["token"]
        clipboard: dict[str, bool] = (await client.get(f"/view/{vm['vm_id']}/state", params={"token": token})
                                      ).json()["clipboard"]
        record = VmRecords(served.parts.store).get(vm["vm_id"])
        assert record is not None and await served.service.clipboard_of(record) == (clipboard["paste"],
                                                                                      clipboard["copy"])
        return clipboard

    async def scenario(client: httpx.AsyncClient) -> None:
        assert (await client.get("/v1/tenants/acme")).json()["clipboard"] == "both"
        answer = await client.put("/v1/tenants/acme/clipboard", json={"clipboard": "paste"})
        assert answer.status_code == 200 and answer.json() == {"clipboard": "paste"}
        assert (await client.get("/v1/tenants/acme")).json()["clipboard"] == "paste"
        plain = await ready_vm(client, tenant="acme")
        kiosk = await ready_vm(client, tenant="acme", template="kiosk", user="bob")
        own = await ready_vm(client, user="cy")  # the operator's own: no tenant's rule
        assert await policy(client, plain) == {"paste": True, "copy": False}
        assert await policy(client, kiosk) == {"paste": False, "copy": False}  # neither allows both ways
        assert await policy(client, own) == {"paste": True, "copy": True}
        error_of(await client.put("/v1/tenants/acme/clipboard", json={"clipboard": "sideways"}), 422)
        assert (await client.get("/v1/tenants/acme")).json()["clipboard"] == "paste"

    served.run(scenario)


# --- the page: renewal, reload, toolbar ------------------------------------------------------------

TTL = 12  # the page trades a token with little time left at half of it: about 6 s


@pytest.fixture
def page_served(tmp_path: Path) -> Iterator[tuple[str, ControllerService]]:
    parts = make_parts(tmp_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    settings = load_settings(state_dir=tmp_path, listen=f"127.0.0.1:{port}", stop_vms_on_exit=True)
    manager = parts.manager(FakeProbes(parts.ipam), limits=Limits(max_vms=2, max_vms_per_user=2),
                            templates=templates_for(settings))
    service = ControllerService(Controller(settings, parts.store, cast(HostNetwork, parts.network), manager),
                                api_key="viewer-page-key-0123456789", tokens=ViewerTokens(os.urandom(32), ttl=TTL))

    def stop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(DEADLINE)

    try:
        with served_in_thread(build_app(service), listener, DEADLINE, stop):
            yield f"http://127.0.0.1:{port}", service
    finally:
        try:
            assert parts.leftovers() == NOTHING
        finally:
            stop_all(parts)


def test_the_page_renews_its_link_so_a_reload_after_the_first_token_expired_opens_the_same_vm(
        page_served: tuple[str, ControllerService]) -> None:
    url, service = page_served
    api = httpx.Client(base_url=url, headers={"Authorization": "Bearer viewer-page-key-0123456789"},
                       trust_env=False, timeout=DEADLINE)
    vm = api.post("/v1/vms", params={"wait": "true"}, json={"user": "ann"}).json()
    link = api.post(f"/v1/vms/{vm['vm_id']}/viewer").json()
    unopened = api.post(f"/v1/vms/{vm['vm_id']}/viewer").json()
    with chromium() as browser:
        page = browser.new_page()
        page.goto(link["url"].replace(service.settings.base_url, url))
        expect(page.locator("#vm")).to_have_attribute("data-state", "ready", timeout=DEADLINE * 1000)
        assert "ends in" in page.inner_text("#vm")
        expect(page.locator("#link")).to_have_attribute("data-state", "renewed", timeout=DEADLINE * 1000)
        renewed = page.url.split("token=")[1]
        assert renewed != link["token"]

        while time.time() <= link["expires_at"] + 1:  # the first link and the unopened one are over
            page.wait_for_timeout(250)
        assert api.get(f"/view/{vm['vm_id']}/state", params={"token": unopened["token"]}).status_code == 401
        page.reload()
        expect(page.locator("#vm")).to_have_attribute("data-state", "ready", timeout=DEADLINE * 1000)
        assert page.locator("#status").get_attribute("data-close-code") != "4401"

        # The toolbar: the clipboard panel opens and closes; reconnect is offered once the desktop closed.
        page.click("#clipboard-toggle")
        expect(page.locator("#clipboard")).to_be_visible()
        page.click("#clipboard-toggle")
        expect(page.locator("#clipboard")).to_be_hidden()
        expect(page.locator("#status")).to_have_attribute("data-state", "closed", timeout=DEADLINE * 1000)
        expect(page.locator("#reconnect")).to_be_enabled()
    api.close()
