"""The guest's profile keeper: what travels of a profile, what is refused on the way in, and the seal."""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import threading
from email.message import Message
from pathlib import Path

import httpx
import pytest

from browservm.guest import agent, profile_keeper
from browservm.guest.agent_http import AgentKey, Server
from browservm.guest.desktop import DesktopConfig
from browservm.guest.profile_keeper import KeeperError, pack, seal, unpack, unseal

BINDING = json.dumps(["acme", "alice"]).encode()


def _profile(root: Path) -> Path:
    profile = root / "chromium"
    (profile / "Default" / "Cache" / "Cache_Data").mkdir(parents=True)
    (profile / "Default" / "Cache" / "Cache_Data" / "data_0").write_bytes(b"x" * 1000)
    (profile / "Default" / "Network").mkdir()
    (profile / "Default" / "Network" / "Cookies").write_bytes(b"SQLite format 3\x00 cookie=s3cr3t")
    (profile / "Local State").write_text('{"profile": {}}')
    (profile / "SingletonLock").symlink_to("browservm-1234")
    (profile / "Default" / "outside").symlink_to("/etc/passwd")
    return profile


def test_a_profile_travels_without_its_caches_links_or_locks(tmp_path: Path) -> None:
    archive = io.BytesIO()
    pack(_profile(tmp_path), archive)
    archive.seek(0)
    target = tmp_path / "home" / ".config" / "chromium"
    target.mkdir(parents=True)
    (target / "stale").write_text("from the VM's own first start")
    assert unpack(archive, target) == 2
    assert (target / "Default" / "Network" / "Cookies").read_bytes().endswith(b"cookie=s3cr3t")
    assert (target / "Local State").read_text() == '{"profile": {}}'
    assert not (target / "Default" / "Cache").exists()
    assert not (target / "SingletonLock").exists() and not (target / "Default" / "outside").exists()
    assert not (target / "stale").exists()  # replaced whole
    assert not target.with_name("chromium.loading").exists()


def _archive(*members: tarfile.TarInfo) -> io.BytesIO:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as archive:
        for member in members:
            archive.addfile(member, io.BytesIO(b"x" * member.size) if member.isfile() else None)
    out.seek(0)
    return out


@pytest.mark.parametrize(("member", "said"), [
    (tarfile.TarInfo("../escape"), "outside"),
    (tarfile.TarInfo("/etc/cron.d/x"), "outside"),
    (tarfile.TarInfo("Default/a/../../../x"), "outside"),
])
def test_a_path_out_of_the_profile_is_refused(tmp_path: Path, member: tarfile.TarInfo, said: str) -> None:
    member.size = 1
    with pytest.raises(KeeperError, match=said):
        unpack(_archive(member), tmp_path / "chromium")
    assert not (tmp_path.parent / "escape").exists()


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_anything_but_files_and_directories_is_refused(tmp_path: Path, kind: bytes) -> None:
    member = tarfile.TarInfo("Default/Cookies")
    member.type, member.linkname = kind, "/etc/shadow"
    with pytest.raises(KeeperError, match="not a file"):
        unpack(_archive(member), tmp_path / "chromium")
    assert not (tmp_path / "chromium").exists()  # the profile there before stays as it was: absent


def test_an_archive_that_unpacks_too_large_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profile_keeper, "MAX_UNPACKED", 1500)
    one, two = tarfile.TarInfo("a"), tarfile.TarInfo("b")
    one.size = two.size = 1000
    with pytest.raises(KeeperError, match="over 1500 bytes"):
        unpack(_archive(one, two), tmp_path / "chromium")


def test_the_seal_opens_only_with_its_key_and_binding() -> None:
    key = secrets.token_bytes(32)
    sealed = seal(key, BINDING, b"the profile's archive")
    assert b"the profile's archive" not in sealed
    assert unseal(key, BINDING, sealed) == b"the profile's archive"
    with pytest.raises(KeeperError, match="another user's"):
        unseal(key, json.dumps(["acme", "bob"]).encode(), sealed)
    with pytest.raises(KeeperError, match="another user's"):
        unseal(secrets.token_bytes(32), BINDING, sealed)
    with pytest.raises(KeeperError, match="another user's"):
        unseal(key, BINDING, sealed[:-1] + bytes([sealed[-1] ^ 1]))
    with pytest.raises(KeeperError, match="format"):
        unseal(key, BINDING, b"\x02" + sealed[1:])


@pytest.mark.parametrize(("headers", "said"), [
    ({}, "32 bytes"),
    ({"X-Profile-Key": "zz", "X-Profile-Binding": ""}, "hex"),
    ({"X-Profile-Key": "00" * 32, "X-Profile-Binding": b"[1, 2]".hex()}, r"\[tenant, user\]"),
])
def test_a_request_without_a_usable_key_or_binding_is_refused(headers: dict[str, str], said: str) -> None:
    message = Message()
    for name, value in headers.items():
        message[name] = value
    with pytest.raises(KeeperError, match=said):
        profile_keeper._key_and_binding(message)


def test_the_user_side_packs_and_unpacks_through_its_streams(tmp_path: Path) -> None:
    """What root runs as the desktop user: `pack DIR` to stdout, `unpack DIR` from stdin (the real program)."""
    source = _profile(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(profile_keeper.__file__).parents[2])}
    packed = subprocess.run([sys.executable, "-m", "browservm.guest.profile_keeper", "pack", str(source)],
                            capture_output=True, check=True, env=env).stdout
    target = tmp_path / "again"
    done = subprocess.run([sys.executable, "-m", "browservm.guest.profile_keeper", "unpack", str(target)],
                          input=packed, capture_output=True, check=True, env=env)
    assert done.stdout.strip() == b"2"
    assert (target / "Default" / "Network" / "Cookies").exists()
    broken = subprocess.run([sys.executable, "-m", "browservm.guest.profile_keeper", "unpack", str(target)],
                            input=b"not an archive", capture_output=True, env=env, check=False)
    assert broken.returncode == 1 and b"unpack:" in broken.stderr
    assert (target / "Default" / "Network" / "Cookies").exists()  # a failed load leaves the profile there


def test_the_keeper_listens_where_nothing_else_in_the_guest_does() -> None:
    """The agent's opener had 7001 (loopback), and a keeper there never started in the oauth image."""
    desktop = DesktopConfig()
    ports = [profile_keeper.PORT, agent.PORT, agent.OPENER_PORT, desktop.vnc_port, desktop.web_port,
             desktop.devtools_port]
    assert len(set(ports)) == len(ports)


def test_a_raw_route_takes_bytes_up_to_its_bound_and_answers_bytes() -> None:
    """The agent's server as the keeper uses it: a key on every request, the body bounded by the route."""
    def echo(body: bytes, headers: Message) -> tuple[int, bytes]:
        return 200, body[::-1] + headers.get("X-Extra", "").encode()

    server = Server(("127.0.0.1", 0), AgentKey("k" * 64), {}, {("POST", "/echo"): (16, echo)})
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/echo"
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {'k' * 64}"}, trust_env=False) as client:
            answer = client.post(url, content=b"\x00\x01sealed", headers={"X-Extra": "!"})
            assert answer.status_code == 200 and answer.content == b"delaes\x01\x00!"
            assert answer.headers["content-type"] == "application/octet-stream"
            too_big = client.post(url, content=b"x" * 17)
            assert too_big.status_code == 413 and "over 16 bytes" in too_big.json()["error"]
            assert client.post(url, content=b"", headers={"Authorization": "Bearer wrong"}).status_code == 401
    finally:
        server.shutdown()
        server.server_close()
