"""`browservm key`, `tenant` and `audit`: locally on the state directory's store, and with --url against a
served controller (the API on a real uvicorn on loopback, its VMs on the fakes of test_api.py).

The local commands work on the very store the served controller reads, so a key made or revoked by
the CLI is taken or refused at the controller's next request: each path is followed from the key's
creation to its use, its last-used time, its revocation and its refusal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from browservm.access.principal import TENANT_PATTERN
from browservm.cli import main
from browservm.cli.access import parse_since
from browservm.client import AsyncClient, Client, KeyRefused, LimitReached, Quota, routes
from browservm.errors import InvalidInput

from .fakes import stop_all
from .test_api import KEY, Served, serve_fakes
from .test_logins import Running

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Running]:
    for name in ("BROWSERVM_URL", "BROWSERVM_API_KEY", "BROWSERVM_CA_FILE"):
        monkeypatch.delenv(name, raising=False)
    served: Served = serve_fakes(tmp_path / "state", max_vms=8, max_vms_per_user=8)
    running = Running(served)
    try:
        yield running
    finally:
        if running.thread.is_alive():
            running.stop()
        stop_all(served.parts)


@pytest.fixture
def state_dir(running: Running) -> Path:
    return running.served.parts.store.path.parent


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], state_dir: Path) -> Run:
    """`browservm ARGS --state-dir <the served controller's>` in this process: exit code, stdout, stderr."""
    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main([*args, "--state-dir", str(state_dir)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def keys(run: Run, *args: str) -> list[dict[str, Any]]:
    code, out, _ = run("key", "list", "--json", *args)
    assert code == 0
    listed: list[dict[str, Any]] = json.loads(out)
    return listed


def the_key(run: Run, key_id: str, *args: str) -> dict[str, Any]:
    found = [key for key in keys(run, *args) if key["key_id"] == key_id]
    assert len(found) == 1
    return found[0]


def follow_a_key(run: Run, url: str, *remote: str) -> None:
    """create -> use it -> the list shows it used -> revoke -> it is refused; `remote`: --url's flags or none."""
    code, out, err = run("key", "create", "--name", "ci runner", "--role", "tenant", "--tenant", "acme", *remote)
    assert code == 0, err
    key = out.strip()
    assert out.count("\n") == 1 and key.startswith("bvm_")  # stdout: the key alone, for KEY=$(...)
    key_id = key.split("_")[1]
    assert f"browservm: key {key_id} (ci runner), role tenant of tenant acme: it is shown only now" in err
    listed = the_key(run, key_id, *remote)
    assert (listed["name"], listed["role"], listed["tenant"], listed["last_used_at"], listed["revoked_at"]) == (
        "ci runner", "tenant", "acme", None, None)
    assert "key" not in listed and key not in json.dumps(keys(run, *remote))  # shown once, never listed

    with Client(url, api_key=key) as as_tenant:
        assert as_tenant.list_vms() == []  # the controller takes the key
    assert the_key(run, key_id, *remote)["last_used_at"] is not None
    code, out, _ = run("key", "list", "--tenant", "acme", *remote)
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "NAME", "ROLE", "TENANT", "CREATED", "LAST", "USED", "REVOKED"]
    assert row.split()[:5] == [key_id, "ci", "runner", "tenant", "acme"] and row.split()[-1] == "-"
    assert row.split()[-2] != "-"  # last used

    code, out, _ = run("key", "revoke", key_id, *remote)
    assert code == 0 and out.startswith(f"key {key_id} (ci runner): revoked at ")
    assert the_key(run, key_id, *remote)["revoked_at"] is not None
    with Client(url, api_key=key) as as_tenant, pytest.raises(KeyRefused):
        as_tenant.list_vms()  # refused at its next request
    assert run("key", "revoke", key_id, *remote)[0] == 0  # idempotent


def test_local_key_commands_work_on_the_store_the_controller_reads(running: Running, cli: Run) -> None:
    follow_a_key(cli, running.url)
    code, out, _ = cli("audit", "--json")
    assert code == 0
    actions = [(e["key_id"], e["action"]) for e in json.loads(out)["entries"]]
    assert ("local", "key create") in actions and ("local", "key revoke") in actions


def test_the_same_commands_through_the_controller_with_url(running: Running, cli: Run,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", KEY)  # the operator's key: an admin key
    follow_a_key(cli, running.url, "--url", running.url)
    code, out, _ = cli("audit", "--json", "--url", running.url)
    assert code == 0
    entries = json.loads(out)["entries"]
    revoked = [e for e in entries if e["action"].startswith("DELETE /v1/keys")]
    assert revoked and revoked[0]["key_id"] == "operator" and revoked[0]["outcome"] == "200"
    assert "bvm_" not in out  # a key's id, never a key


def test_quota_show_and_audit_through_the_controller(running: Running, cli: Run,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", KEY)
    url = ["--url", running.url]
    code, out, _ = cli("tenant", "quota", "acme", "--max-vms", "1", "--max-mem-mib", "4096", *url)
    assert code == 0 and out.splitlines()[:3] == ["tenant acme  (clipboard: both)",
                                                  "  max_vms          1          (0 VM(s) live)",
                                                  "  max_mem_mib      4096       (0 MiB in live VMs)"]
    code, out, _ = cli("tenant", "clipboard", "acme", "paste", "--json", *url)
    assert code == 0 and json.loads(out)["clipboard"] == "paste"
    # Only the limits given change; `none` clears one.
    code, out, _ = cli("tenant", "quota", "acme", "--max-mem-mib", "none", "--json", *url)
    assert code == 0 and json.loads(out)["quota"] == {"max_vms": 1, "max_mem_mib": None, "logins_per_hour": None}

    code, out, _ = cli("key", "create", "--name", "app", "--role", "tenant", "--tenant", "acme", *url)
    assert code == 0
    tenant_key = out.strip()
    with Client(running.url, api_key=tenant_key) as as_tenant:
        vm = as_tenant.create_vm("ann", mem_mib=512)
        with pytest.raises(LimitReached) as refused:
            as_tenant.create_vm("bob", mem_mib=512)
        assert refused.value.limit == "tenant.max_vms"
    code, out, _ = cli("tenant", "show", "acme", "--json", *url)
    assert code == 0 and json.loads(out)["usage"]["vms"] == 1 and json.loads(out)["usage"]["mem_mib"] == 512

    code, out, _ = cli("audit", "--vm", vm.vm_id, "--json", *url)
    assert code == 0 and [e["action"] for e in json.loads(out)["entries"]][:1] == ["POST /v1/vms"]
    code, out, err = cli("audit", "--tenant", "acme", "--limit", "1", *url)
    assert code == 0 and len(out.splitlines()) == 2 and "browservm: more entries: add --after " in err
    after = err.split("--after ")[1].split()[0]
    code, out, _ = cli("audit", "--tenant", "acme", "--after", after, "--json", *url)
    page = json.loads(out)["entries"]
    assert code == 0 and page and all(e["id"] > int(after) and e["tenant"] == "acme" for e in page)

    # A tenant key reads its own tenant and trail, and may not list or make keys.
    monkeypatch.setenv("BROWSERVM_API_KEY", tenant_key)
    assert cli("tenant", "show", "acme", *url)[0] == 0
    code, out, _ = cli("audit", "--json", *url)
    assert code == 0 and {e["tenant"] for e in json.loads(out)["entries"]} == {"acme"}
    code, _, err = cli("key", "list", *url)
    assert code == 1 and "may not" in err
    code, _, err = cli("tenant", "show", "other", *url)
    assert code == 1 and "may not" in err


@pytest.mark.parametrize(("args", "message"), [
    (("key", "create", "--name", "x", "--role", "tenant"), "--tenant: a tenant key needs its tenant"),
    (("key", "create", "--name", "x", "--role", "tenant", "--tenant", "Acme"), "--tenant: must be 1-32 of a-z"),
    (("key", "create", "--name", "x", "--role", "admin", "--tenant", "acme"), "--tenant: an admin key belongs to no"),
    (("key", "create", "--name", "", "--role", "admin"), "--name: must be 1-64 characters, not only spaces"),
    (("key", "revoke", "ABC!"), "KEY_ID: must be 1-32 of a-z and 0-9"),
    (("tenant", "quota", "acme", "--max-vms", "-1"), "--max-vms: must be a whole number from 0 to 100000"),
    (("tenant", "quota", "acme", "--logins-per-hour", "lots"), "--logins-per-hour: must be a whole number, or none"),
    (("tenant", "show", "a_b"), "TENANT: must be 1-32 of a-z"),
    (("audit", "--since", "yesterday"), "--since: must be a time ago (30m, 2h, 7d)"),
    (("audit", "--limit", "0"), "--limit: must be from 1 to 1000"),
    (("audit", "--vm", "../vm"), "--vm: "),
])
@pytest.mark.parametrize("mode", ["local", "url"])
def test_bad_input_exits_2_naming_the_flag_before_anything_is_asked(
        running: Running, cli: Run, args: tuple[str, ...], message: str, mode: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", KEY)
    given = [*args, "--url", running.url] if mode == "url" else list(args)
    code, out, err = cli(*given)
    assert (code, out) == (2, "") and err.startswith(f"browservm: error: {message}"), err
    assert [key["key_id"] for key in keys(cli)] == ["operator"]  # nothing made


def test_a_missing_store_is_named_and_nothing_is_made(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BROWSERVM_URL", raising=False)
    absent = tmp_path / "absent"
    assert main(["key", "list", "--state-dir", str(absent)]) == 1
    assert capsys.readouterr().err == (f"browservm: error: state {absent / 'state.sqlite3'}: no controller's store "
                                       "here: give its state directory with --state-dir, or the controller with "
                                       "--url\n")
    assert not absent.exists()


def test_since_takes_a_time_ago_a_date_a_time_or_unix_seconds() -> None:
    now = 1_800_000_000.0
    assert parse_since("90m", now) == now - 5400 and parse_since("7d", now) == now - 7 * 86400
    assert parse_since("1700000000", now) == 1_700_000_000.0 and parse_since("0", now) == 0.0
    assert parse_since("2026-12-07", now) == 1796601600.0  # midnight UTC
    assert parse_since("2026-12-07T09:00:00+01:00", now) == 1796601600.0 + 8 * 3600
    for bad in ("nan", "inf", "-5", "3w", ""):
        with pytest.raises(InvalidInput):
            parse_since(bad, now)


def test_the_async_client_has_the_same_access_methods(running: Running) -> None:
    async def scenario() -> None:
        async with AsyncClient(running.url, api_key=KEY) as bvm:
            made = await bvm.create_key("async", "tenant", "acme")
            assert made.key.startswith(f"bvm_{made.key_id}_") and made.key not in repr(made)
            assert [k.key_id for k in await bvm.list_keys("acme")] == [made.key_id]
            assert (await bvm.set_quota("acme", Quota(max_vms=3))).max_vms == 3
            assert (await bvm.tenant("acme")).quota.max_vms == 3
            assert await bvm.set_clipboard("acme", "copy") == "copy"
            assert (await bvm.tenant("acme")).clipboard == "copy"
            assert (await bvm.revoke_key(made.key_id)).revoked_at is not None
            page = await bvm.audit(tenant="acme", limit=10)
            assert [e.action for e in page.entries][:1] == ["POST /v1/keys"] and page.next is None
    asyncio.run(scenario())


def test_the_client_checks_a_tenant_as_the_server_does() -> None:
    assert f"^{routes.TENANT.pattern}$" == TENANT_PATTERN
