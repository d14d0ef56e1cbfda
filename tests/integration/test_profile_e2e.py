"""A browser that remembers (issue 22), end to end with real guests: a person signs in at the local OAuth
test server in one VM's Chromium (a login with `keep_profile`), the VM ends, and the same user's next VM
comes to the server still signed in (its Chromium sends the session cookie); another user's does not.
On the host the profile is only ciphertext: the session cookie is not in the file, though it is in the
profile once the user's key opens it. One VM per profile at a time (409), and DELETE forgets it.

The `oauth` image under QEMU, a real `browservm serve` with a warm pool of one, so the first VM is a
pooled one (restored from a snapshot, Chromium already running: the keeper restarts it with the
profile) and the next ones whatever the pool has then (cold when it is empty).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from browservm.guest.profile_keeper import unseal
from browservm.oauth.vault import load_key
from browservm.profiles.store import ProfileStore, binding
from browservm.store import Store
from browservm.vm.pool import POOL_USER
from tests.support.oauth_server import SESSION_COOKIE, listen
from tests.support.serve_process import sample_provider, serving

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]
AUTH_PORT = 18444
_WAIT_S = 600.0
_POOL_S = 900.0


def _until(what: str, check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.5)
    return found


def _login(client: httpx.Client, user: str) -> dict[str, Any]:
    """A login with the user's profile, to its end: captured, and its VM gone (its profile saved)."""
    started = client.post("/v1/logins", json={"user": user, "provider": "sample", "keep_profile": True})
    assert started.status_code == 202, started.text
    login: dict[str, Any] = started.json()
    vm = client.get(f"/v1/vms/{login['vm_id']}").json()
    assert vm["profile"] == "persistent", vm

    def ended() -> dict[str, Any] | None:
        now: dict[str, Any] = client.get(f"/v1/logins/{login['login_id']}").json()
        if now["state"] in ("failed", "timed-out", "cancelled"):
            console = client.get(f"/v1/vms/{login['vm_id']}/console", params={"lines": 10_000}).json()
            said = [line for line in console.get("lines", []) if "profile" in line or "Failed" in line]
            pytest.fail(f"login {now['state']} at {now['hop']}: {now['reason']}; the console says: {said[-40:]}")
        return now if now["state"] == "captured" and now["vm_destroyed"] else None
    done: dict[str, Any] = _until(f"login of {user}", ended, _WAIT_S)
    done["started_from"] = vm["started_from"]
    return done


def test_a_sign_in_outlives_the_vm_for_its_user_only_and_the_host_keeps_only_ciphertext(
        oauth_controllers: Controllers, tmp_path: Path) -> None:
    controller = oauth_controllers.open()
    gateway = str(controller.network.plan.segments[0].gateway.ip)
    providers = sample_provider(tmp_path, f"http://{gateway}:{AUTH_PORT}")
    state_dir = oauth_controllers.state_dir
    options = ["--rootfs", str(oauth_controllers.rootfs), "--guest-port", str(AUTH_PORT), "--pool", "1"]
    with serving(oauth_controllers.netns, state_dir, oauth_controllers.kernel, options,
                 {"BROWSERVM_PROVIDERS_FILE": str(providers), "BROWSERVM_POOL_VM_MIB": "2048"}) as serve:
        client = serve.client(timeout=300)
        _until("a pooled VM ready", lambda: any(vm["user"] == POOL_USER and vm["state"] == "ready"
                                                for vm in client.get("/v1/vms").json()), _POOL_S)
        with listen(host=gateway, port=AUTH_PORT, netns=controller.network.netns, approve="auto") as server:
            first = _login(client, "alice")
            assert first["started_from"] == "pooled"  # the profile went into a running, restored VM
            assert server.record.sessions_seen == [None]  # a new profile: not signed in yet
            kept = client.get("/v1/users/alice/profile").json()
            assert kept["size_bytes"] > 0 and kept["saved_at"] is not None and kept["in_use_by"] is None, kept

            second = client.post("/v1/logins", json={"user": "alice", "provider": "sample", "keep_profile": True})
            assert second.status_code == 202, second.text
            # One VM per profile: a second use while the first is live is refused, naming the VM.
            again = client.post("/v1/vms", json={"user": "alice", "profile": "persistent"})
            assert again.status_code == 409, again.text
            assert again.json()["error"]["vm_id"] == second.json()["vm_id"]
            _until("alice's second login", lambda: client.get(f"/v1/logins/{second.json()['login_id']}").json()
                   .get("vm_destroyed"), _WAIT_S)
            assert server.record.sessions_seen[1] == server.record.sessions_issued[0]  # still signed in

            other = _login(client, "bob")
            assert server.record.sessions_seen[2] is None  # another user's VM is not signed in as alice
            print("VMs started from:", first["started_from"], other["started_from"])

        # The host file is ciphertext: the session is not in it, nor the cookie's name; opened with alice's
        # key (as only her next VM does) the profile holds the cookie.
        files = sorted((state_dir / "profiles").glob("*.sealed"))
        assert len(files) == 2  # alice's and bob's
        session = server.record.sessions_issued[0].encode()
        for path in files:
            data = path.read_bytes()
            assert session not in data and SESSION_COOKIE.encode() not in data
            assert oct(path.stat().st_mode & 0o777) == "0o600"
        opened = _open_profile(state_dir, "", "alice")
        assert any(SESSION_COOKIE.encode() in content for name, content in opened.items() if name.endswith("Cookies"))

        assert client.delete("/v1/users/alice/profile").json() == {"user": "alice", "removed": True}
        assert client.get("/v1/users/alice/profile").status_code == 404
        assert len(list((state_dir / "profiles").glob("*.sealed"))) == 1
        client.close()
    leaks = [str(p) for p in state_dir.rglob("*") if p.is_file() and session in p.read_bytes()]
    assert leaks == [] and session.decode() not in "".join(serve.output), leaks


def _open_profile(state_dir: Path, tenant: str, user: str) -> dict[str, bytes]:
    """The user's profile as its next VM opens it: the key unsealed with the vault key, the file with the key."""
    with Store(state_dir / "state.sqlite3") as database:
        store = ProfileStore(database, load_key(state_dir), state_dir / "profiles", 64 << 20)
        archive = unseal(store.key(tenant, user), binding(tenant, user), store.read(tenant, user))
    files = {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(archive)), mode="r:") as tar:
        for member in tar:
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                files[member.name] = extracted.read()
    return files
