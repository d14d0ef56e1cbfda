"""Idempotency-Key on every POST (issue 21): a replay gets the first answer and nothing is done twice, also
while the first request is still running; a key is for one request and one caller."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .fakes import stop_all
from .test_api import DEADLINE, Served, serve_fakes


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    made = serve_fakes(tmp_path / "state", None, max_vms=8, max_vms_per_user=8)
    yield made
    stop_all(made.parts)


def idem(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def vm_count(client: httpx.AsyncClient) -> int:
    return len((await client.get("/v1/vms")).json())


def test_a_replay_while_the_first_create_runs_waits_for_it_and_gets_the_same_vm(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        release = served.probes.hang_at("net.arp")
        first = asyncio.create_task(client.post("/v1/vms", params={"wait": True}, json={"user": "ann"},
                                                headers=idem("create-1")))
        await asyncio.wait_for(served.probes.reached["net.arp"].wait(), DEADLINE)
        second = asyncio.create_task(client.post("/v1/vms", params={"wait": True}, json={"user": "ann"},
                                                 headers=idem("create-1")))
        await asyncio.sleep(0)  # the replay is waiting, not answered
        assert not second.done()
        release.set()
        a, b = await asyncio.wait_for(asyncio.gather(first, second), DEADLINE)
        assert (a.status_code, b.status_code) == (200, 200), (a.text, b.text)
        assert a.json() == b.json() and a.json()["state"] == "ready"
        assert (a.headers["idempotent-replayed"], b.headers["idempotent-replayed"]) == ("false", "true")
        assert await vm_count(client) == 1
        later = await client.post("/v1/vms", params={"wait": True}, json={"user": "ann"}, headers=idem("create-1"))
        assert later.json()["vm_id"] == a.json()["vm_id"] and await vm_count(client) == 1

    served.run(scenario)


def test_a_key_is_for_one_request_and_one_caller(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        made = await client.post("/v1/vms", json={"user": "ann"}, headers=idem("k"))
        assert made.status_code == 202
        other = await client.post("/v1/vms", json={"user": "bob"}, headers=idem("k"))
        assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key", other.text
        tenant_key = (await client.post("/v1/keys", json={"name": "t", "role": "tenant", "tenant": "acme"})).json()
        async with served.client({"Authorization": f"Bearer {tenant_key['key']}"}) as tenant:
            theirs = await tenant.post("/v1/vms", json={"user": "ann"}, headers=idem("k"))
        assert theirs.status_code == 202 and theirs.json()["vm_id"] != made.json()["vm_id"]  # another caller
        for bad in ("", "x" * 256, "tab\tin it", "é"):
            answer = await client.post("/v1/vms", json={"user": "c"},
                                       headers={b"Idempotency-Key": bad.encode()})
            assert answer.status_code == 422 and answer.json()["error"]["field"] == "Idempotency-Key", bad
        assert await vm_count(client) == 2

    served.run(scenario)


def test_refusals_for_a_reason_a_retry_may_not_meet_are_not_kept(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        await client.put("/v1/tenants/acme/quota", json={"max_vms": 0})
        full = await client.post("/v1/vms", json={"user": "x", "tenant": "acme"}, headers=idem("retry-me"))
        assert full.status_code == 429
        await client.put("/v1/tenants/acme/quota", json={"max_vms": 1})
        retried = await client.post("/v1/vms", json={"user": "x", "tenant": "acme"}, headers=idem("retry-me"))
        assert retried.status_code == 202 and retried.headers["idempotent-replayed"] == "false", retried.text
        async with served.client({}) as anonymous:  # refused before the caller was known: not kept either
            assert (await anonymous.post("/v1/vms", json={"user": "y"}, headers=idem("anon"))).status_code == 401

    served.run(scenario)


def test_a_new_keys_secret_is_never_kept_for_a_replay(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        body = {"name": "app", "role": "tenant", "tenant": "acme"}
        made = await client.post("/v1/keys", json=body, headers=idem("key-1"))
        again = await client.post("/v1/keys", json=body, headers=idem("key-1"))
        assert made.status_code == 201 and again.status_code == 409, again.text
        assert made.json()["key_id"] in again.json()["error"]["message"] and made.json()["key"] not in again.text
        assert len((await client.get("/v1/keys")).json()) == 2  # the operator's and this one: made once

    served.run(scenario)
    stored = b"".join(path.read_bytes() for path in served.service.settings.state_dir.glob("state.sqlite3*"))
    assert b"bvm_" not in stored


def test_a_request_cut_off_by_a_restart_is_not_done_again(served: Served) -> None:
    async def scenario(client: httpx.AsyncClient) -> None:
        first = await client.post("/v1/vms", json={"user": "ann"}, headers=idem("cut"))
        assert first.status_code == 202
        # As a controller that died while running it would have left its row.
        with served.parts.store.transaction() as db:
            db.execute("UPDATE idempotency SET state = 'running', status = NULL, body = NULL, owner = 'gone'")
        replay = await client.post("/v1/vms", json={"user": "ann"}, headers=idem("cut"))
        assert replay.status_code == 409 and "cut off" in replay.json()["error"]["message"], replay.text
        assert await vm_count(client) == 1

    served.run(scenario)
