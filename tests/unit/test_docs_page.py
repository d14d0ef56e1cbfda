"""/docs and the operator page as an operator uses them: Debian's Chromium (driven by Playwright) signs in
with the key through the login form, opens /docs, finds the routes listed, enters the key through Swagger
UI's "Authorize" and runs requests with "Try it out" -> "Execute"; the operator page lists every page of
VMs (a tenant key's own only) and signs out. Every request the browser makes must stay on the
controller: the page works without internet (Swagger UI's files come from the fastapi-swagger package).

The app is the real one (build_app) on a real uvicorn on loopback, around a real ControllerService whose
manager runs on the fakes of tests/unit/fakes.py (`sleep` as the VMM): no root, no guest. Every wait is
for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect

from browservm.api.app import build_app
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.hostnet.host import HostNetwork
from browservm.vm.parts import Limits
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from tests.support.browsers import chromium, served_in_thread

from .fakes import NOTHING, FakeProbes, Parts, make_parts, stop_all
from .test_api import PUBLIC

DEADLINE = 30.0  # for any one condition; a passing run meets each in a few seconds at most
KEY = "docs-page-key-0123456789"
SCHEME = "apiKey"


@dataclass
class Served:
    url: str
    service: ControllerService
    parts: Parts


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    parts = make_parts(tmp_path)
    manager = parts.manager(FakeProbes(parts.ipam), limits=Limits(max_vms=4, max_vms_per_user=4))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    settings = load_settings(state_dir=tmp_path, listen=f"127.0.0.1:{port}", stop_vms_on_exit=True)
    service = ControllerService(Controller(settings, parts.store, cast(HostNetwork, parts.network), manager),
                                api_key=KEY, tokens=ViewerTokens(os.urandom(32)))
    def stop(loop: asyncio.AbstractEventLoop) -> None:  # destroys every VM the page created (stop_vms_on_exit)
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(DEADLINE)

    try:
        with served_in_thread(build_app(service), listener, DEADLINE, stop):
            yield Served(f"http://127.0.0.1:{port}", service, parts)
    finally:
        try:
            assert parts.leftovers() == NOTHING
        finally:
            stop_all(parts)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def test_every_route_that_takes_the_key_declares_the_bearer_scheme_so_authorize_applies_to_it(
        served: Served) -> None:
    response = httpx.get(f"{served.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, trust_env=False)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    assert document["openapi"].startswith("3.1")  # what Swagger UI 4 could not read
    scheme = document["components"]["securitySchemes"][SCHEME]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    operations = {(path, method): operation for path, ops in document["paths"].items()
                  for method, operation in ops.items()}
    assert ("/v1/vms", "get") in operations and ("/healthz", "get") in operations
    for (path, method), operation in operations.items():
        expected: list[dict[str, list[str]]] | None = None if path in PUBLIC else [{SCHEME: []}]
        assert operation.get("security") == expected, (method, path)


def _execute(page: Page, operation: str, status: int) -> Request:
    """"Execute" on the opened operation: the request the page sent, once the page shows `status` as its
    answer (a status shown before is replaced, so wait for this one's)."""
    block = page.locator(f"#{operation}")
    with page.expect_response(lambda response: urlsplit(response.url).path.startswith("/v1/"),
                              timeout=DEADLINE * 1000) as answered:
        block.locator(".btn.execute").click()
    assert answered.value.status == status, (answered.value.status, answered.value.text())
    expect(block.locator(".live-responses-table .response .response-col_status").first).to_have_text(
        str(status), timeout=DEADLINE * 1000)
    return answered.value.request


def _open(page: Page, operation: str) -> None:
    block = page.locator(f"#{operation}")
    block.locator(".opblock-summary-control").click()
    block.locator(".try-out__btn").click()


def test_an_operator_signs_in_opens_docs_authorizes_with_the_key_and_runs_requests_from_the_page(
        served: Served, browser: Browser) -> None:
    context = browser.new_context()
    elsewhere: list[str] = []
    context.on("request", lambda request: None if request.url.startswith(served.url + "/")
               or request.url.startswith("data:") else elsewhere.append(request.url))
    # Nothing leaves the machine even if the page asks: the assertion below says whether it asked.
    context.route(lambda url: not url.startswith(served.url + "/"), lambda route: route.abort())
    try:
        page = context.new_page()
        page.set_default_timeout(DEADLINE * 1000)

        # Signs in with the key through the login form: the session cookie lets the browser read /docs.
        page.goto(f"{served.url}/login")
        page.fill("input[name=key]", KEY)
        with page.expect_navigation():
            page.press("input[name=key]", "Enter")
        assert urlsplit(page.url).path == "/", page.url
        page.goto(f"{served.url}/docs")

        # Swagger UI read the OpenAPI 3.1 document and lists the routes.
        # (Swagger UI 4 shows "Unable to render this definition ... does not specify a valid version field".)
        page.locator(".swagger-ui .info .title, .swagger-ui .version-pragma").first.wait_for()
        assert page.locator(".swagger-ui .version-pragma").count() == 0, page.inner_text(".swagger-ui")
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("browservm")
        listed = page.locator(".opblock-summary-path[data-path='/v1/vms']")
        listed.first.wait_for()
        assert listed.count() == 2  # GET (list) and POST (create)

        # With the cookie alone a change is refused (403: a foreign page's request would carry it too) ...
        _open(page, "operations-vms-createVm")
        body = page.locator("#operations-vms-createVm textarea.body-param__text")
        body.fill('{"user": "docs"}')
        request = _execute(page, "operations-vms-createVm", 403)
        assert "authorization" not in request.headers

        # ... then the key through "Authorize": sent as `Authorization: Bearer KEY` with each request.
        page.locator(".auth-wrapper .btn.authorize").click()
        dialog = page.locator(".dialog-ux .modal-ux")
        dialog.locator("input").fill(KEY)
        dialog.locator("button.authorize").click()
        dialog.locator("button.btn-done").click()
        dialog.wait_for(state="detached")

        request = _execute(page, "operations-vms-createVm", 202)
        assert request.headers.get("authorization") == f"Bearer {KEY}"
        created = page.locator("#operations-vms-createVm .live-responses-table .microlight").first
        assert '"user": "docs"' in created.inner_text()

        _open(page, "operations-vms-listVms")
        request = _execute(page, "operations-vms-listVms", 200)
        assert request.headers.get("authorization") == f"Bearer {KEY}"
        assert request.method == "GET" and urlsplit(request.url).path == "/v1/vms"
        answer = page.locator("#operations-vms-listVms .live-responses-table .microlight").first
        assert '"user": "docs"' in answer.inner_text()
    finally:
        context.close()
    assert elsewhere == []


def test_the_swagger_files_are_the_operators_only_and_nothing_else_of_the_package_is_served(served: Served) -> None:
    with httpx.Client(base_url=served.url, trust_env=False) as client:
        assert client.get("/swagger/swagger-ui-bundle.js").status_code == 401
        keyed = {"Authorization": f"Bearer {KEY}"}
        script = client.get("/swagger/swagger-ui-bundle.js", headers=keyed)
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        for name in ("__init__.py", "..%2F__init__.py", "main.py"):
            assert client.get(f"/swagger/{name}", headers=keyed).status_code == 404, name


def test_the_operator_page_lists_every_page_of_vms_shows_tenants_and_signs_out(
        served: Served, browser: Browser, tmp_path: Path) -> None:
    records = VmRecords(served.parts.store)
    for n in range(501):  # more than one page of the listing (500): the page follows X-Next-Cursor
        record = VmRecord(vm_id=f"vm-{n:012x}", user="ann", vcpus=1, mem_mib=1024, state=VmState.ENDED,
                          directory=str(tmp_path / f"vm{n}"), holds_resources=False, tenant="acme" if n < 3 else "")
        records.insert(record, max_total=1000, max_per_user=1000)
    tenant_key = served.service.keys.create("page", "tenant", "acme")[1]
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(DEADLINE * 1000)
        for key, listed in ((KEY, 501), (tenant_key, 3)):
            page.goto(f"{served.url}/login")
            page.fill("input[name=key]", key)
            with page.expect_navigation():
                page.press("input[name=key]", "Enter")
            expect(page.locator("#summary")).to_have_text(f"{listed} VM(s): {listed} ended")
            expect(page.locator("#vms tr")).to_have_count(listed)
            expect(page.locator("th.tenant")).to_be_visible()  # some VMs are a tenant's
            with page.expect_navigation():
                page.click("#signout button")
            assert urlsplit(page.url).path == "/login", page.url
            page.goto(f"{served.url}/")  # the session is over: back to the sign-in form
            assert urlsplit(page.url).path == "/login", page.url
    finally:
        context.close()
