"""The list API of a service (issue 21): GET /v1/vms pages by cursor and filters by user, state, label and
tenant; labels and a timeout at create; the timeout extended; timestamps in RFC 3339 beside the numbers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from browservm.oauth.records import LoginRecord, LoginRecords, new_login_id
from browservm.store import Store
from browservm.vm.pool import POOL_USER
from browservm.vm.records import VmQuery, VmRecord, VmRecords
from browservm.vm.state import VmState

from .test_api import Served, create


async def every_page(client: httpx.AsyncClient, limit: int, **params: Any) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        answer = await client.get("/v1/vms", params={**params, "limit": limit,
                                                     **({"cursor": cursor} if cursor else {})})
        assert answer.status_code == 200, answer.text
        pages.append([vm["vm_id"] for vm in answer.json()])
        cursor = answer.headers.get("x-next-cursor")
        if cursor is None:
            assert "link" not in answer.headers
            return pages
        assert answer.headers["link"].endswith('rel="next"') and f"cursor={cursor}" in answer.headers["link"]


def test_pages_under_concurrent_creates_skip_and_repeat_nothing(serve: Callable[..., Served]) -> None:
    served = serve(max_vms=40, max_vms_per_user=40)

    async def scenario(client: httpx.AsyncClient) -> None:
        first = [(await create(client, user=f"u{n}", wait=False))["vm_id"] for n in range(7)]
        seen: list[str] = []
        cursor = None
        made_meanwhile: list[str] = []
        while True:
            # Between pages, others create VMs: they come on later pages, once each.
            if len(made_meanwhile) < 12:
                made_meanwhile += [vm["vm_id"] for vm in await asyncio.gather(
                    *(create(client, user=f"m{len(made_meanwhile)}-{n}", wait=False) for n in range(2)))]
            answer = await client.get("/v1/vms", params={"limit": 3, **({"cursor": cursor} if cursor else {})})
            seen += [vm["vm_id"] for vm in answer.json()]
            cursor = answer.headers.get("x-next-cursor")
            if cursor is None:
                break
        assert len(seen) == len(set(seen)), seen  # nothing repeated
        assert set(first) | set(made_meanwhile) == set(seen)  # nothing skipped
        assert seen[:7] == first  # in the order they appeared

    served.run(scenario)


def test_filters_by_user_state_label_and_tenant(serve: Callable[..., Served]) -> None:
    served = serve(max_vms=10, max_vms_per_user=10)

    async def scenario(client: httpx.AsyncClient) -> None:
        a = await create(client, user="Ann", labels={"app": "crm", "env": "prod"})
        b = await create(client, user="ann", labels={"app": "crm", "env": "dev"})
        c = await create(client, user="bob", labels={"app": "mail"}, tenant="acme")
        served.probes.fail["net.arp"] = "no ARP reply"
        d = await create(client, user="bob")
        served.probes.fail.clear()
        assert a["labels"] == {"app": "crm", "env": "prod"} and d["labels"] == {}

        async def ids(**params: Any) -> set[str]:
            answer = await client.get("/v1/vms", params=params)
            assert answer.status_code == 200, answer.text
            return {vm["vm_id"] for vm in answer.json()}

        assert await ids(user="ANN") == {a["vm_id"], b["vm_id"]}  # one spelling per person
        assert await ids(state="failed") == {d["vm_id"]}
        assert await ids(label="app=crm") == {a["vm_id"], b["vm_id"]}
        assert await ids(label=["app=crm", "env=dev"]) == {b["vm_id"]}
        assert await ids(label="app=nothing") == set()
        assert await ids(tenant="acme") == {c["vm_id"]}
        assert await ids(tenant="") == {a["vm_id"], b["vm_id"], d["vm_id"]}  # the operator's own
        for params, field in (({"state": "sleeping"}, "state"), ({"label": "no equals sign"}, "label"),
                              ({"cursor": "3"}, "cursor"), ({"limit": 0}, "limit"), ({"limit": 501}, "limit")):
            answer = await client.get("/v1/vms", params=params)
            assert answer.status_code == 422 and answer.json()["error"]["field"].startswith(field), answer.text
        for labels, field in (({"Bad Key": "x"}, "labels"), ({f"k{n}": "v" for n in range(17)}, "labels"),
                              ({"k": "x" * 257}, "labels")):
            answer = await client.post("/v1/vms", json={"user": "x", "labels": labels})
            assert answer.status_code == 422 and answer.json()["error"]["field"].startswith(field), answer.text

    served.run(scenario)


def test_a_timeout_at_create_is_extended_reaped_and_shown_in_rfc_3339(serve: Callable[..., Served]) -> None:
    served = serve(max_lifetime=3600)

    async def scenario(client: httpx.AsyncClient) -> None:
        vm = await create(client, user="ann", timeout_s=120)
        assert vm["expires_at"] == pytest.approx(vm["created_at"] + 120, abs=1)
        assert datetime.fromisoformat(vm["expires_at_rfc3339"]).timestamp() == pytest.approx(vm["expires_at"], abs=0.01)
        assert datetime.fromisoformat(vm["created_at_rfc3339"]).timestamp() == pytest.approx(vm["created_at"], abs=0.01)
        assert vm["created_at_rfc3339"].endswith("Z")
        extended = await client.post(f"/v1/vms/{vm['vm_id']}/extend", json={"timeout_s": 600})
        assert extended.status_code == 200, extended.text
        assert extended.json()["expires_at"] == pytest.approx(time.time() + 600, abs=5)
        # The reaper ends it when its timeout is over, saying so.
        record = VmRecords(served.parts.store).get(vm["vm_id"])
        assert record is not None
        due = served.service.due_for_reaping([record], time.time() + 601)
        assert due[vm["vm_id"]].startswith("reaped: its timeout ended at ")
        capped = await client.post(f"/v1/vms/{vm['vm_id']}/extend", json={"timeout_s": 86400})
        assert capped.json()["expires_at"] == pytest.approx(vm["created_at"] + 3600, abs=1)  # max_lifetime
        for body in ({"timeout_s": 10}, {"timeout_s": "600"}, {}):
            answer = await client.post(f"/v1/vms/{vm['vm_id']}/extend", json=body)
            assert answer.status_code == 422 and answer.json()["error"]["field"] == "timeout_s", answer.text
        release = served.probes.hang_at("net.arp")  # held while it boots: its create writes its record
        booting = await create(client, user="eve", wait=False)
        early = await client.post(f"/v1/vms/{booting['vm_id']}/extend", json={"timeout_s": 600})
        assert early.status_code == 409 and "only a ready VM" in early.json()["error"]["message"], early.text
        release.set()
        plain = await create(client, user="bob")
        assert plain["expires_at"] == pytest.approx(plain["created_at"] + 3600, abs=1)
        await client.delete(f"/v1/vms/{vm['vm_id']}")
        gone = await client.post(f"/v1/vms/{vm['vm_id']}/extend", json={"timeout_s": 600})
        assert gone.status_code == 404, gone.text

    served.run(scenario)


def test_a_pooled_vm_takes_its_new_owners_place_in_the_sequence(tmp_path: Path) -> None:
    """A claim from the warm pool gives the VM a new sequence number: a client that paged past the older VMs
    sees it on its next page, not behind its cursor."""
    with Store(tmp_path / "state.sqlite3") as store:
        records = VmRecords(store)

        def record(vm_id: str, user: str, in_pool: bool = False) -> VmRecord:
            made = VmRecord(vm_id=vm_id, user=user, vcpus=1, mem_mib=1024, directory=str(tmp_path / vm_id),
                            in_pool=in_pool, state=VmState.READY)
            records.insert(made, max_total=10, max_per_user=10)
            return made

        pooled = record("vm-00000000000a", POOL_USER, in_pool=True)
        record("vm-00000000000b", "ann")
        page, cursor = records.page(VmQuery(limit=1))
        assert [vm.vm_id for vm in page] == ["vm-00000000000a"] and cursor is not None
        pooled.user, pooled.in_pool = "bob", False
        assert records.claim(pooled, POOL_USER, 10)
        rest, end = records.page(VmQuery(after=cursor, limit=10))
        assert [vm.vm_id for vm in rest] == ["vm-00000000000b", "vm-00000000000a"] and end is None


def test_logins_page_newest_first_and_filter_by_user_state_and_tenant(tmp_path: Path) -> None:
    with Store(tmp_path / "state.sqlite3") as store:
        records = LoginRecords(store)
        made = []
        for n in range(7):
            login = LoginRecord(new_login_id(), f"u{n % 2}", f"p{n}", tenant="acme" if n % 3 == 0 else "")
            records.insert(login)
            made.append(login.login_id)
        seen, cursor = [], None
        while True:
            page, cursor = records.all(limit=3, before=cursor)
            seen += [login.login_id for login in page]
            records.insert(LoginRecord(new_login_id(), "late", f"p{len(seen)}"))  # newer: not on later pages
            if cursor is None:
                break
        assert seen == made[::-1]
        assert {login.user for login in records.all("u1")[0]} == {"u1"}
        assert {login.login_id for login in records.all(tenant="acme")[0]} == {made[0], made[3], made[6]}
        assert len(records.all(state="booting")[0]) == 10 and records.all(state="captured")[0] == []


def test_the_logins_listing_pages_through_the_api(serve: Callable[..., Served]) -> None:
    served = serve()
    for n in range(5):
        LoginRecords(served.parts.store).insert(LoginRecord(new_login_id(), "ann", f"p{n}"))

    async def scenario(client: httpx.AsyncClient) -> None:
        first = await client.get("/v1/logins", params={"limit": 2, "user": "ann"})
        assert len(first.json()) == 2 and "user=ann" in first.headers["link"]
        rest = await client.get("/v1/logins", params={"limit": 10, "user": "ann",
                                                      "cursor": first.headers["x-next-cursor"]})
        assert len(rest.json()) == 3 and "x-next-cursor" not in rest.headers
        assert (await client.get("/v1/logins", params={"state": "asleep"})).status_code == 422

    served.run(scenario)
