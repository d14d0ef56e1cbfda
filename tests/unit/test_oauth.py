"""The login package's parts on their own: the providers catalog, the login state machine, the login
records, the credential vault, the agent client against hostile answers, and the store's migration."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import sqlite3
import stat
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path, PurePosixPath

import pytest

from browservm.errors import InvalidInput
from browservm.guest.credentials import credentials_digest
from browservm.hostnet.netns import NetworkNamespace
from browservm.images import rootfs
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.oauth.agent import MAX_BODY, AgentClient, AgentEndpoint
from browservm.oauth.catalog import GUEST_HOME, load_catalog
from browservm.oauth.errors import (
    AgentError,
    CatalogError,
    CredentialsNotFound,
    LoginConflict,
    LoginRunning,
    LoginTransition,
    VaultError,
)
from browservm.oauth.records import LoginRecord, LoginRecords, new_login_id, validate_login_id
from browservm.oauth.states import ALLOWED, FINAL, LoginState, transition
from browservm.oauth.vault import KEY_FILE, Vault, key_id, load_key, seal, unseal
from browservm.store import Store
from browservm.vm.guest_http import MAX_HEAD

TOKEN = "sk-test-0123456789abcdefTOKEN"  # a credential's value, to look for where it must not be
FILES = {"/home/browser/.sample/credentials.json": json.dumps({"access_token": TOKEN}).encode()}


# --- the catalog ----------------------------------------------------------------------------------

def test_every_shipped_provider_loads_with_absolute_paths_inside_the_vm() -> None:
    catalog = load_catalog()
    assert catalog.names() == ["claude-code", "codex", "gemini-cli", "sample"]
    for name in catalog.names():
        provider = catalog.get(name)
        request = provider.agent_request()
        assert set(request) == {"provider", "command", "env", "credentials", "required_keys", "timeout_s"}
        assert PurePosixPath(provider.command[0]).is_absolute()
        for path in provider.credentials:
            assert PurePosixPath(path).is_absolute() and PurePosixPath(path).is_relative_to(GUEST_HOME), path
        assert 1 <= provider.timeout_s <= 3600
        assert provider.required_keys, name


def test_catalog_agrees_with_the_image_the_guest_engineer_builds() -> None:
    """The executables and the desktop user's home are the image's (images/rootfs.py)."""
    assert PurePosixPath("/home") / rootfs.DESKTOP_USER == GUEST_HOME
    catalog = load_catalog()
    tools = {name: package for name, package, _ in rootfs.NPM_TOOLS["oauth"]}
    for provider_name, tool in (("claude-code", "claude"), ("codex", "codex"), ("gemini-cli", "gemini")):
        provider = catalog.get(provider_name)
        assert provider.command[0] == f"/usr/local/bin/{tool}"
        assert provider.package == tools[tool]
    assert catalog.get("sample").command[0] == "/usr/lib/browservm/bin/browservm-sample-login"
    assert "browservm-sample-login" in rootfs.OAUTH_PROGRAMS


def test_operator_file_overrides_fields_merges_env_and_adds_providers(tmp_path: Path) -> None:
    operator = tmp_path / "providers.toml"
    operator.write_text('''
[providers.sample]
command = ["/usr/lib/browservm/bin/browservm-sample-login", "--issuer", "http://10.0.0.1:9000"]
timeout_s = 30
env = { EXTRA = "1" }

[providers.internal]
package = "internal-cli"
command = ["/opt/internal/bin/login"]
browser = "xdg-open"
callback = "127.0.0.1:8085"
credentials = ["/home/browser/.internal/token.json"]
required_keys = ["token"]
timeout_s = 120
''')
    catalog = load_catalog(operator)
    sample = catalog.get("sample")
    assert sample.command[2] == "http://10.0.0.1:9000" and sample.timeout_s == 30
    assert sample.env == {"EXTRA": "1"} and sample.credentials == ["/home/browser/.sample/credentials.json"]
    assert catalog.get("internal").callback == "127.0.0.1:8085"
    assert catalog.get("codex").env == {"CODEX_HOME": "/home/browser/.codex"}  # untouched
    assert catalog.sources[-1] == str(operator)


def test_operator_file_in_json(tmp_path: Path) -> None:
    operator = tmp_path / "providers.json"
    operator.write_text(json.dumps({"providers": {"codex": {"timeout_s": 60, "env": {"RUST_LOG": "info"}}}}))
    codex = load_catalog(operator).get("codex")
    assert codex.timeout_s == 60 and codex.env == {"CODEX_HOME": "/home/browser/.codex", "RUST_LOG": "info"}


@pytest.mark.parametrize(("entry", "field", "words"), [
    ('timeout_s = 0', "timeout_s", "greater than or equal to 1"),
    ('credentials = ["~/.codex/auth.json"]', "credentials", "not an absolute path"),
    ('credentials = ["/home/browser/../root/x.json"]', "credentials", "normalised"),
    ('credentials = ["/root/.codex/auth.json"]', "credentials", "under the desktop user's home"),
    ('command = ["codex", "login"]', "command", "not an absolute path"),
    ('browser = "firefox"', "browser", "BROWSER"),
    ('callback = "0.0.0.0:80"', "callback", "127.0.0.1:PORT"),
    ('env = { "1BAD" = "x" }', "env", "not a variable name"),
    ('surprise = 1', "surprise", "Extra inputs"),
])
def test_a_bad_entry_is_an_error_naming_the_provider_and_field(tmp_path: Path, entry: str, field: str,
                                                               words: str) -> None:
    operator = tmp_path / "providers.toml"
    operator.write_text(f"[providers.codex]\n{entry}\n")
    with pytest.raises(CatalogError) as caught:
        load_catalog(operator)
    assert caught.value.provider == "codex" and caught.value.field.startswith(field)
    assert str(operator) in str(caught.value) and words in str(caught.value), str(caught.value)


def test_a_new_provider_missing_fields_and_an_unreadable_file_are_clear_errors(tmp_path: Path) -> None:
    operator = tmp_path / "providers.toml"
    operator.write_text('[providers.half]\ncommand = ["/bin/true"]\n')
    with pytest.raises(CatalogError, match=r"provider 'half', field 'package': Field required"):
        load_catalog(operator)
    operator.write_text("[providers\n")
    with pytest.raises(CatalogError, match="not valid TOML"):
        load_catalog(operator)
    with pytest.raises(CatalogError, match="cannot read it"):
        load_catalog(tmp_path / "missing.toml")
    unknown = load_catalog()
    with pytest.raises(Exception, match="no provider 'nope'; the catalog has claude-code, codex"):
        unknown.get("nope")


# --- the state machine ----------------------------------------------------------------------------

ALL_PAIRS = list(itertools.product(LoginState, LoginState))


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a.value}->{b.value}" for a, b in ALL_PAIRS])
def test_every_transition_is_allowed_or_refused_as_the_table_says(current: LoginState, new: LoginState) -> None:
    expected = {
        LoginState.BOOTING: {LoginState.STARTING, LoginState.FAILED, LoginState.TIMED_OUT, LoginState.CANCELLED},
        LoginState.STARTING: {LoginState.WAITING, LoginState.CAPTURED, LoginState.FAILED, LoginState.TIMED_OUT,
                              LoginState.CANCELLED},
        LoginState.WAITING: {LoginState.CAPTURED, LoginState.FAILED, LoginState.TIMED_OUT, LoginState.CANCELLED},
    }.get(current, set())
    assert set(ALLOWED[current]) == expected
    if new in expected:
        assert transition("login-000000000001", current, new) is new
    else:
        with pytest.raises(LoginTransition, match=f"cannot go from {current.value} to {new.value}"):
            transition("login-000000000001", current, new)


def test_final_states_are_the_four_outcomes() -> None:
    assert {state.value for state in FINAL} == {"captured", "failed", "timed-out", "cancelled"}
    assert all(state.final == (state in FINAL) for state in LoginState)


# --- login records --------------------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "state.sqlite3") as opened:
        yield opened


def test_one_running_login_per_user_and_provider_is_held_by_the_store(store: Store) -> None:
    records = LoginRecords(store)
    first = LoginRecord(new_login_id(), "ann", "codex")
    records.insert(first)
    with pytest.raises(LoginRunning, match=first.login_id):
        records.insert(LoginRecord(new_login_id(), "ann", "codex"))
    records.insert(LoginRecord(new_login_id(), "ann", "sample"))  # another provider
    records.insert(LoginRecord(new_login_id(), "bob", "codex"))  # another user
    first.state = LoginState.FAILED
    records.save(first)
    records.insert(LoginRecord(new_login_id(), "ann", "codex"))  # the first one ended
    assert len(records.all("ann")[0]) == 3 and len(records.all()[0]) == 4 and len(records.running()) == 3


def test_login_record_writes_are_compare_and_set(store: Store) -> None:
    records = LoginRecords(store)
    login = LoginRecord(new_login_id(), "ann", "codex")
    records.insert(login)
    other = records.get(login.login_id)
    assert other is not None
    other.state = LoginState.CANCELLED
    records.save(other)
    login.state = LoginState.STARTING
    with pytest.raises(LoginConflict, match="it is cancelled now"):
        records.save(login)
    stored = records.get(login.login_id)
    assert stored is not None and stored.state == LoginState.CANCELLED


def test_login_ids_are_checked() -> None:
    assert validate_login_id(new_login_id()).startswith("login-")
    for bad in ("login-XYZ", "vm-000000000000", "login-0123456789abc", "../etc"):
        with pytest.raises(InvalidInput):
            validate_login_id(bad)


def test_a_schema_3_database_gets_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE vms (vm_id TEXT PRIMARY KEY, user TEXT NOT NULL, state TEXT NOT NULL, "
                   "holds_resources INTEGER NOT NULL, data TEXT NOT NULL, version INTEGER NOT NULL DEFAULT 0)")
        db.execute("INSERT INTO vms VALUES ('vm-000000000001', 'ann', 'ready', 1, '{}', 3)")
        db.execute("CREATE TABLE leases (vm_id TEXT PRIMARY KEY, address INTEGER NOT NULL UNIQUE, tap TEXT NOT NULL "
                   "UNIQUE, mac TEXT NOT NULL UNIQUE, leased_at REAL NOT NULL)")
        db.execute("INSERT INTO leases VALUES ('vm-000000000001', 3232261122, 'fc-1', '02:fc:00:00:00:01', 1.0)")
        db.execute("PRAGMA user_version=3")
    db.close()
    with Store(path) as opened:
        assert opened.read("PRAGMA user_version")[0][0] == 9
        tables = {row[0] for row in opened.read("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"logins", "credentials", "vms", "api_keys", "tenants", "audit", "webhooks", "deliveries",
                "profiles"} <= tables
        indexes = {row[0] for row in opened.read("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "vms_one_per_profile" in indexes  # schema 9: one live VM per persistent profile
        assert opened.read("SELECT version, tenant FROM vms")[0] == (3, "")
        # A lease from before templates had egress policies has the host's (schema 8).
        lease = Ipam(opened, NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")).get("vm-000000000001")
        assert lease is not None and str(lease.address) == "192.168.100.2/24" and lease.egress is None


def test_a_schema_4_databases_credentials_become_the_operators_own_and_still_open(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE credentials (user TEXT NOT NULL, provider TEXT NOT NULL, login_id TEXT NOT NULL, "
                   "captured_at REAL NOT NULL, key_id TEXT NOT NULL, sealed BLOB NOT NULL, "
                   "PRIMARY KEY (user, provider))")
        db.execute("INSERT INTO credentials VALUES ('ann', 'sample', 'login-000000000001', 1.0, ?, ?)",
                   (key_id(KEY), seal(KEY, "ann", "sample", FILES)))
        db.execute("PRAGMA user_version=4")
    db.close()
    with Store(path) as opened:
        assert opened.read("SELECT tenant, user FROM credentials") == [("", "ann")]
        assert Vault(opened, KEY).get("ann", "sample").files == FILES
        with pytest.raises(CredentialsNotFound):
            Vault(opened, KEY).get("ann", "sample", tenant="acme")


# --- the vault ------------------------------------------------------------------------------------

KEY = bytes(range(32))


def test_seal_round_trip_and_nothing_in_plaintext() -> None:
    sealed = seal(KEY, "ann", "sample", FILES)
    assert TOKEN.encode() not in sealed and b"access_token" not in sealed
    assert unseal(KEY, "ann", "sample", sealed) == FILES
    assert seal(KEY, "ann", "sample", FILES) != sealed  # a fresh nonce each time


def test_wrong_key_and_tampered_ciphertext_are_refused() -> None:
    sealed = seal(KEY, "ann", "sample", FILES)
    with pytest.raises(VaultError, match="do not authenticate") as caught:
        unseal(bytes(32), "ann", "sample", sealed)
    assert TOKEN not in str(caught.value)
    for position in (1, 13, len(sealed) // 2, len(sealed) - 1):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(VaultError):
            unseal(KEY, "ann", "sample", bytes(tampered))
    with pytest.raises(VaultError, match="not in a format"):
        unseal(KEY, "ann", "sample", b"\x02" + sealed[1:])


def test_associated_data_binds_user_and_provider() -> None:
    sealed = seal(KEY, "ann", "sample", FILES)
    with pytest.raises(VaultError, match="sealed for another user or provider"):
        unseal(KEY, "bob", "sample", sealed)
    with pytest.raises(VaultError):
        unseal(KEY, "ann", "codex", sealed)
    # No ambiguity from joining the two: ("a", "nn") is not ("an", "n").
    with pytest.raises(VaultError):
        unseal(KEY, "ann", "sample", seal(KEY, "an", "nsample", FILES))


def test_vault_rows_are_bound_to_their_user_in_the_store(store: Store) -> None:
    vault = Vault(store, KEY)
    assert vault.put("ann", "sample", "login-000000000001", FILES)
    stored = vault.get("ann", "sample")
    assert stored.files == FILES and stored.login_id == "login-000000000001"
    # Someone with write access to the database moves ann's row to bob: it does not open as bob's.
    with store.transaction() as db:
        db.execute("INSERT INTO credentials (tenant, user, provider, login_id, captured_at, key_id, sealed) "
                   "SELECT tenant, 'bob', provider, login_id, captured_at, key_id, sealed FROM credentials "
                   "WHERE user = 'ann'")
        # ... or to another tenant's ann: not hers either.
        db.execute("INSERT INTO credentials (tenant, user, provider, login_id, captured_at, key_id, sealed) "
                   "SELECT 'acme', user, provider, login_id, captured_at, key_id, sealed FROM credentials "
                   "WHERE user = 'ann' AND tenant = ''")
    with pytest.raises(VaultError, match="sealed for another user or provider"):
        vault.get("bob", "sample")
    with pytest.raises(VaultError, match="sealed for another user or provider"):
        vault.get("ann", "sample", tenant="acme")
    raw = b"".join(row[0] for row in store.read("SELECT sealed FROM credentials") if isinstance(row[0], bytes))
    assert TOKEN.encode() not in raw
    with pytest.raises(VaultError, match="sealed with another key"):
        Vault(store, bytes(32)).get("ann", "sample")


def test_a_newer_capture_replaces_an_older_one_and_not_the_other_way_round(store: Store) -> None:
    vault = Vault(store, KEY)
    newer = {"/home/browser/.sample/credentials.json": b'{"access_token": "newer"}'}
    assert vault.put("ann", "sample", "login-000000000001", FILES, captured_at=100.0)
    assert vault.put("ann", "sample", "login-000000000002", newer, captured_at=200.0)
    assert not vault.put("ann", "sample", "login-000000000003", FILES, captured_at=150.0)  # late and older
    assert vault.get("ann", "sample").files == newer
    assert vault.delete("ann", "sample") and not vault.delete("ann", "sample")


def test_vault_key_is_made_once_0600_and_reused(tmp_path: Path) -> None:
    key = load_key(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert len(key) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    assert load_key(tmp_path / "state") == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    given = "ab" * 32
    assert load_key(tmp_path / "other", given) == bytes.fromhex(given)
    assert not (tmp_path / "other").exists()
    with pytest.raises(VaultError, match="not 64 hex digits") as caught:
        load_key(tmp_path, "zz" * 32)
    assert "zz" not in str(caught.value)  # the message names the source, never the value
    assert key_id(key) != key_id(bytes(32))


# --- the agent client against a hostile agent -------------------------------------------------------

async def _serve_raw(answer: bytes) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            writer.write(answer)
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _client(port: int) -> AgentClient:
    return AgentClient(AgentEndpoint(NetworkNamespace(None), IPv4Address("127.0.0.1"), port), "k" * 64, timeout=2.0)


def _http(status: int, body: bytes, headers: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{headers}\r\n").encode() + body


@pytest.mark.parametrize(("answer", "words"), [
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (MAX_HEAD + 10) + b"\r\n\r\n", "headers are over"),
    (_http(200, b"x" * (MAX_BODY + 1)), "over the"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (MAX_BODY + 10), "over the"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding"),
    (b"SSH-2.0-OpenSSH\r\n\r\n", "HTTP status line"),
    (_http(200, b"not json"), "not JSON"),
    (_http(200, b'{"state": "pwned"}'), "wrong shape: state"),
    (_http(200, json.dumps({"state": "failed", "output": ["x"] * 500}).encode()), "wrong shape: output"),
    (_http(200, b'{"state": "idle"'), "not JSON"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}", "closed in the middle"),
])
def test_the_agent_client_bounds_and_checks_every_answer(answer: bytes, words: str) -> None:
    async def scenario() -> None:
        server, port = await _serve_raw(answer)
        async with server:
            with pytest.raises(AgentError, match=words) as caught:
                await _client(port).status()
        assert caught.value.hop == "agent.protocol"
    asyncio.run(scenario())


def test_the_agent_client_names_each_hop() -> None:
    async def scenario() -> None:
        server, port = await _serve_raw(_http(401, b'{"error": "unauthorized"}'))
        async with server:
            with pytest.raises(AgentError) as caught:
                await _client(port).status()
            assert caught.value.hop == "agent.auth"
        with pytest.raises(AgentError) as caught:
            await _client(port).status()  # nothing listens now
        assert caught.value.hop == "agent.connect"
        good = json.dumps({"files": {p: base64.b64encode(d).decode() for p, d in FILES.items()},
                           "sha256": credentials_digest(FILES)}).encode()
        server, port = await _serve_raw(_http(200, good))
        async with server:
            handed = await _client(port).handover(list(FILES))
            assert handed.files == FILES
            with pytest.raises(AgentError, match="not the provider's"):
                await _client(port).handover(["/home/browser/other.json"])
        wrong = json.dumps({"files": {p: "e30=" for p in FILES}, "sha256": credentials_digest(FILES)}).encode()
        server, port = await _serve_raw(_http(200, wrong))
        async with server:
            with pytest.raises(AgentError, match="do not hash") as caught:
                await _client(port).handover(list(FILES))
            assert caught.value.hop == "agent.handover"
        server, port = await _serve_raw(_http(409, b'{"error": "a login is running"}'))
        async with server:
            with pytest.raises(AgentError, match="already running") as caught:
                await _client(port).login({})
            assert caught.value.hop == "agent.login"
    asyncio.run(scenario())


def test_a_silent_agent_times_out() -> None:
    async def scenario() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(10)
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            client = _client(server.sockets[0].getsockname()[1])
            client.timeout = 0.3
            with pytest.raises(AgentError, match=r"no complete answer within 0\.3 s"):
                await client.status()
    asyncio.run(scenario())
