"""Tenants, keys and roles, quotas, the audit trail and sessions (issue 21), through the API of a controller
with fake VMs (test_api.py's harness).

The role table covers every route the app has (test_credentials_table.ROUTES, which itself must name
every route): a tenant key meets another tenant's VM, login and credentials on each, and never sees or
changes them; admin routes are 403 to it.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from browservm.access.audit import AuditEntry, AuditTrail
from browservm.oauth.records import LoginRecord, LoginRecords
from browservm.oauth.vault import Vault, load_key
from browservm.store import Store
from browservm.vm.state import VmState
from browservm.webhooks.records import WebhookStore

from .test_api import KEY, Served, create
from .test_credentials_table import ROUTES

ADMIN_ONLY = {("GET", "/readyz"), ("GET", "/metrics"), ("GET", "/v1/doctor"), ("GET", "/v1/vms/{vm_id}/diagnose"),
              ("POST", "/v1/keys"), ("GET", "/v1/keys"), ("DELETE", "/v1/keys/{key_id}"),
              ("PUT", "/v1/tenants/{tenant}/quota"), ("PUT", "/v1/tenants/{tenant}/clipboard")}
OTHERS = {"vm_id": "vm-0000000000b1", "login_id": "login-0000000000b1", "user": "ann", "provider": "sample",
          "tenant": "other", "name": "swagger-ui.css", "key_id": "0123456789ab", "webhook_id": "wh-0000000000b1"}
SECRET = b'{"access_token": "other-tenants-token"}'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def new_key(client: httpx.AsyncClient, role: str = "tenant", tenant: str | None = "acme",
                  name: str = "app") -> dict[str, Any]:
    response = await client.post("/v1/keys", json={"name": name, "role": role, "tenant": tenant})
    assert response.status_code == 201, response.text
    made: dict[str, Any] = response.json()
    return made


def others_things(served: Served) -> None:
    """Tenant `other`'s VM, login, credentials and webhook, as its own requests would have left them."""
    record = served.insert(VmState.BOOTING, OTHERS["vm_id"])
    record.tenant = "other"
    with served.parts.store.transaction() as db:  # insert() writes no tenant: set as a create of `other`'s would
        db.execute("UPDATE vms SET tenant = 'other', data = json_set(data, '$.tenant', 'other') WHERE vm_id = ?",
                   (record.vm_id,))
    LoginRecords(served.parts.store).insert(LoginRecord(login_id=OTHERS["login_id"], user="ann", provider="sample",
                                                        vm_id=record.vm_id, tenant="other"))
    key = load_key(served.service.settings.state_dir, None)
    Vault(served.parts.store, key).put("ann", "sample", OTHERS["login_id"], {"/creds.json": SECRET}, tenant="other")
    WebhookStore(served.parts.store).create("other", "http://127.0.0.1:9/other-tenants-hook", ["vm.ready"],
                                            OTHERS["webhook_id"])


def test_the_role_table_a_tenant_key_never_sees_or_changes_another_tenants_things(
        serve: Callable[..., Served]) -> None:
    served = serve()
    others_things(served)

    async def scenario(client: httpx.AsyncClient) -> None:
        acme = (await new_key(client))["key"]
        async with served.client(bearer(acme)) as tenant:
            for (method, path), kind in sorted(ROUTES.items()):
                if kind != "operator":
                    continue
                url = path
                for name, value in OTHERS.items():
                    url = url.replace("{" + name + "}", value)
                body = {"user": "ann", "provider": "sample", "tenant": "other"} if path == "/v1/logins" else (
                    {"timeout_s": 600}) if path.endswith("/extend") else (
                    {"url": "http://127.0.0.1:9/", "events": ["vm.ready"], "tenant": "other"}
                    if path == "/v1/webhooks" else {"user": "ann", "tenant": "other"}) if method == "POST" else (
                    {"max_vms": 1} if method == "PUT" else {"disabled": True} if method == "PATCH" else None)
                if path == "/v1/keys" and method == "POST":
                    body = {"name": "x", "role": "admin"}
                response = await tenant.request(method, url, json=body)
                where = (method, path, response.status_code, response.text[:200])
                assert "other-tenants-token" not in response.text and "other-tenants-hook" not in response.text, where
                if path == "/v1/audit":  # its own requests only, which name what it asked for
                    assert {entry["tenant"] for entry in response.json()["entries"]} == {"acme"}, where
                elif response.status_code == 200 and method == "GET":
                    assert OTHERS["vm_id"] not in response.text and OTHERS["login_id"] not in response.text, where
                if (method, path) in ADMIN_ONLY:
                    assert response.status_code == 403, where
                elif (method, path) == ("DELETE", "/v1/vms/{vm_id}"):
                    assert response.json()["removed"] is False, where  # as for a VM that is not there
                elif "{vm_id}" in path or "{login_id}" in path or "{webhook_id}" in path:
                    assert response.status_code == 404, where  # "not found", as one that never was
                elif "{tenant}" in path or method == "POST":
                    assert response.status_code == 403, where  # naming another tenant is refused outright
                elif "{user}" in path:
                    assert response.status_code in (200, 404), where  # its own tenant's ann: none, or nothing
                else:
                    assert response.status_code == 200, where
            # Naming the other tenant in a query is refused too.
            for url in ("/v1/audit?tenant=other", "/v1/logins?tenant=other", "/v1/webhooks?tenant=other",
                        "/v1/users/ann/credentials/sample?tenant=other"):
                assert (await tenant.get(url)).status_code == 403, url
        # Nothing of `other`'s was touched.
        vm = await client.get(f"/v1/vms/{OTHERS['vm_id']}")
        assert vm.status_code == 200 and vm.json()["tenant"] == "other"
        login = await client.get(f"/v1/logins/{OTHERS['login_id']}")
        assert login.json()["state"] == "booting"
        creds = await client.get("/v1/users/ann/credentials/sample", params={"tenant": "other"})
        assert creds.status_code == 200, creds.text
        hooks = (await client.get("/v1/webhooks", params={"tenant": "other"})).json()
        assert [(hook["webhook_id"], hook["disabled"]) for hook in hooks] == [(OTHERS["webhook_id"], False)]

    served.run(scenario)


def test_a_tenants_vms_and_logins_are_its_own_and_an_admin_sees_all(serve: Callable[..., Served]) -> None:
    served = serve(max_vms_per_user=4, max_vms=8)

    async def scenario(client: httpx.AsyncClient) -> None:
        acme, beta = (await new_key(client))["key"], (await new_key(client, tenant="beta"))["key"]
        async with served.client(bearer(acme)) as a, served.client(bearer(beta)) as b:
            mine = await create(a, user="ann")
            theirs = await create(b, user="ann")  # the same user name in another tenant: another person
            assert (mine["tenant"], theirs["tenant"]) == ("acme", "beta")
            assert [vm["vm_id"] for vm in (await a.get("/v1/vms")).json()] == [mine["vm_id"]]
            assert [vm["vm_id"] for vm in (await b.get("/v1/vms")).json()] == [theirs["vm_id"]]
            assert (await a.post(f"/v1/vms/{theirs['vm_id']}/viewer")).status_code == 404
            assert (await a.delete(f"/v1/vms/{theirs['vm_id']}")).json()["removed"] is False
        everyone = {vm["vm_id"]: vm["tenant"] for vm in (await client.get("/v1/vms")).json()}
        assert everyone == {mine["vm_id"]: "acme", theirs["vm_id"]: "beta"}
        ops = await create(client, user="ann", tenant="beta")  # an admin creates for a tenant
        assert ops["tenant"] == "beta"

    served.run(scenario)


def test_quotas_are_enforced_at_the_edge_with_429_naming_the_limit(serve: Callable[..., Served]) -> None:
    served = serve(max_vms_per_user=8, max_vms=8)

    async def scenario(client: httpx.AsyncClient) -> None:
        acme = (await new_key(client))["key"]
        quota = await client.put("/v1/tenants/acme/quota", json={"max_vms": 2, "max_mem_mib": 2560})
        assert quota.status_code == 200, quota.text
        async with served.client(bearer(acme)) as tenant:
            await create(tenant, user="a", mem_mib=1024)
            await create(tenant, user="b", mem_mib=1536)  # exactly at both limits: allowed
            over = await tenant.post("/v1/vms", json={"user": "c", "mem_mib": 512})
            assert over.status_code == 429 and over.json()["error"]["limit"] == "tenant.max_vms", over.text
            await client.put("/v1/tenants/acme/quota", json={"max_vms": 3, "max_mem_mib": 2560})
            over = await tenant.post("/v1/vms", json={"user": "c", "mem_mib": 512})
            assert over.status_code == 429 and over.json()["error"]["limit"] == "tenant.max_mem_mib", over.text
            assert "2560 MiB in VMs" in over.json()["error"]["message"]
            usage = (await tenant.get("/v1/tenants/acme")).json()
            assert usage["usage"] == {"vms": 2, "mem_mib": 2560, "logins_last_hour": 0}
            assert usage["quota"] == {"max_vms": 3, "max_mem_mib": 2560, "logins_per_hour": None}
        bad = await client.put("/v1/tenants/acme/quota", json={"max_vms": -1})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "max_vms"
        # Another tenant (and the operator's own VMs) are not held by acme's quota.
        await create(client, user="d", tenant="beta")
        await create(client, user="e")

    served.run(scenario)


def test_concurrent_creates_never_go_over_a_tenants_quota(serve: Callable[..., Served]) -> None:
    served = serve(max_vms_per_user=8, max_vms=8)

    async def scenario(client: httpx.AsyncClient) -> None:
        acme = (await new_key(client))["key"]
        await client.put("/v1/tenants/acme/quota", json={"max_vms": 3})
        async with served.client(bearer(acme)) as tenant:
            answers = await asyncio.gather(*(tenant.post("/v1/vms", json={"user": f"u{n}"}) for n in range(8)))
        assert sorted(a.status_code for a in answers) == [202] * 3 + [429] * 5
        assert len((await client.get("/v1/vms")).json()) == 3

    served.run(scenario)


def test_keys_are_stored_hashed_shown_once_named_and_revoked_at_once(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        made = await new_key(client, name="billing app")
        key = made["key"]
        assert key.startswith(f"bvm_{made['key_id']}_")
        listed = {k["key_id"]: k for k in (await client.get("/v1/keys")).json()}
        assert "key" not in listed[made["key_id"]] and listed[made["key_id"]]["name"] == "billing app"
        assert listed["operator"]["role"] == "admin"  # the state directory's key is the first admin key
        async with served.client(bearer(key)) as tenant:
            assert (await tenant.get("/v1/vms")).status_code == 200
            used = {k["key_id"]: k for k in (await client.get("/v1/keys")).json()}[made["key_id"]]
            assert used["last_used_at"] is not None and abs(used["last_used_at"] - time.time()) < 60
            revoked = await client.delete(f"/v1/keys/{made['key_id']}")
            assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
            refused = await tenant.get("/v1/vms")
            assert refused.status_code == 401 and "revoked" in refused.json()["error"]["message"]
        assert (await client.delete("/v1/keys/operator")).status_code == 409
        assert (await client.delete("/v1/keys/0123456789ab")).status_code == 404
        for body, field in (({"name": "", "role": "tenant", "tenant": "acme"}, "name"),
                            ({"name": "x", "role": "root", "tenant": "acme"}, "role"),
                            ({"name": "x", "role": "tenant", "tenant": "Not A Tenant"}, "tenant")):
            answer = await client.post("/v1/keys", json=body)
            assert answer.status_code == 422 and answer.json()["error"]["field"] == field, answer.text
        no_tenant = await client.post("/v1/keys", json={"name": "x", "role": "tenant"})
        assert no_tenant.status_code == 422 and no_tenant.json()["error"]["field"] == "tenant"

    served.run(scenario)
    database = served.service.settings.state_dir / "state.sqlite3"
    stored = b"".join(path.read_bytes() for path in database.parent.glob("state.sqlite3*"))
    assert b"bvm_" not in stored and KEY.encode() not in stored  # digests only


def test_every_change_is_audited_with_the_key_id_never_the_key(serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> None:
        made = await new_key(client)
        async with served.client(bearer(made["key"])) as tenant:
            vm = await create(tenant, user="ann")
            await tenant.delete(f"/v1/vms/{vm['vm_id']}")
            assert (await tenant.post("/v1/vms", json={"user": ""})).status_code == 422
            await tenant.get("/v1/users/ann/credentials/sample")
            own = (await tenant.get("/v1/audit")).json()["entries"]
        assert [(e["action"], e["target"], e["outcome"], e["key_id"], e["tenant"]) for e in own] == [
            ("POST /v1/keys", made["key_id"], "201", "operator", "acme"),  # the admin's, for this tenant
            ("POST /v1/vms", vm["vm_id"], "200", made["key_id"], "acme"),
            ("DELETE /v1/vms/{vm_id}", vm["vm_id"], "200", made["key_id"], "acme"),
            ("POST /v1/vms", "", "422", made["key_id"], "acme"),
            ("GET /v1/users/{user}/credentials/{provider}", "ann/sample", "404", made["key_id"], "acme")]
        assert all(e["request_id"] for e in own)
        everything = (await client.get("/v1/audit")).json()["entries"]
        assert everything[0]["action"] == "POST /v1/keys" and everything[0]["key_id"] == "operator"
        assert everything[0]["target"] == made["key_id"]
        by_vm = (await client.get("/v1/audit", params={"vm": vm["vm_id"]})).json()["entries"]
        assert len(by_vm) == 2
        page = (await client.get("/v1/audit", params={"limit": 2})).json()
        rest = (await client.get("/v1/audit", params={"after": page["next"]})).json()
        assert [e["id"] for e in page["entries"] + rest["entries"]] == [e["id"] for e in everything]
        # 401s are the access log's: nobody fills the trail without a key.
        async with served.client({}) as anonymous:
            await anonymous.post("/v1/vms", json={"user": "x"})
        assert len((await client.get("/v1/audit")).json()["entries"]) == len(everything)

    served.run(scenario)
    dumped = b"".join(path.read_bytes() for path in served.service.settings.state_dir.glob("state.sqlite3*"))
    assert KEY.encode() not in dumped


def test_the_trail_is_append_only_and_pruned_by_age(serve: Callable[..., Served]) -> None:
    served = serve()
    trail = served.service.audit

    async def scenario(client: httpx.AsyncClient) -> None:
        await trail.record(AuditEntry("k", "acme", "old", "", "200", at=time.time() - trail.retention_s - 10))
        await trail.record(AuditEntry("k", "acme", "new", "", "200"))

    served.run(scenario)
    with sqlite3.connect(served.service.settings.state_dir / "state.sqlite3") as db, \
            pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE audit SET outcome = '500'")
    with Store(served.service.settings.state_dir / "state.sqlite3") as store:
        fresh = AuditTrail(store, trail.retention_s)
        assert fresh.prune(time.time()) == 1
        assert [row.action for row in fresh.query()] == ["new"]


def test_a_session_names_its_key_expires_ends_at_sign_out_and_with_its_key(serve: Callable[..., Served]) -> None:
    served = serve()
    access = served.service.access

    async def scenario(client: httpx.AsyncClient) -> None:
        made = await new_key(client)
        async with served.client({}) as browser:
            form = await browser.post("/login", content=f"key={made['key']}".encode(),
                                      headers={"Content-Type": "application/x-www-form-urlencoded"})
            assert form.status_code == 303 and form.headers["location"] == "/"
            cookie = form.cookies["browservm_session"]
            assert cookie.startswith(f"{made['key_id']}.") and made["key"] not in cookie
            assert "Max-Age=43200" in form.headers["set-cookie"]
            assert (await browser.get("/v1/vms", headers={"Cookie": f"browservm_session={cookie}"})).status_code == 200
            out = await browser.post("/logout", headers={"Cookie": f"browservm_session={cookie}"})
            assert out.status_code == 303 and 'browservm_session=""' in out.headers["set-cookie"]
            principal = access.keys.live(made["key_id"])
            assert principal is not None
            expired = access.session(principal, now=time.time() - access.session_ttl - 1)
            assert (await browser.get("/v1/vms", headers={"Cookie": f"browservm_session={expired}"})).status_code == 401
            await client.delete(f"/v1/keys/{made['key_id']}")
            assert (await browser.get("/v1/vms", headers={"Cookie": f"browservm_session={cookie}"})).status_code == 401

    served.run(scenario)
