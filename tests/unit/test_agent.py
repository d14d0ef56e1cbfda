"""The guest agent on loopback: its API, states, bounds, handover once, cancel and timeout.

The agent runs in-process (its HTTP servers on threads), the tools as real processes under the real
runner (toolrun.py, on a pseudo-terminal) and open their page with the real opener; only the
terminal window is left out (no display here) and Chromium is stood in for by a command named in
BROWSERVM_CHROMIUM (the opener's fallback path), since the opener's DevTools path is tested
against a real Chromium in test_agent_opener.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from browservm.guest import configdisk
from browservm.guest.agent import (
    Agent,
    AgentConfig,
    DesktopUser,
    controller_server,
    opener_server,
    write_opener_file,
)
from browservm.guest.agent_http import read_secret
from browservm.guest.credentials import captured_marker, credentials_digest
from browservm.guest.markers import parse_marker
from tests.support.agent_client import AgentClient, drive_login
from tests.support.oauth_server import listen

SECRET = "ab" * 32
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Running:
    agent: Agent
    client: AgentClient
    home: Path
    bin: Path
    markers: list[str]

    def tool(self, name: str, body: str) -> str:
        path = self.bin / name
        path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
        path.chmod(0o755)
        return str(path)

    def login(self, command: list[str], credentials: list[str] | None = None, timeout_s: float = 30,
              required_keys: list[str] | None = None, env: dict[str, str] | None = None) -> dict[str, Any]:
        return {"provider": "fake", "command": command,
                "credentials": credentials or [str(self.home / ".fake" / "creds.json")],
                "required_keys": ["access_token"] if required_keys is None else required_keys,
                "timeout_s": timeout_s, "env": env or {}}


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    home, bin_dir, run_dir = tmp_path / "home", tmp_path / "bin", tmp_path / "run"
    home.mkdir()
    bin_dir.mkdir()
    python_path = f"{ROOT / 'src'}:{ROOT}"
    _script(bin_dir / "opener",
            f"#!/bin/sh\nPYTHONPATH={python_path} exec {sys.executable} -m browservm.guest.opener \"$@\"\n")
    # Stands in for Chromium: records the URL it was given (the page a person would see).
    _script(bin_dir / "chromium-standin", f"#!/bin/sh\necho \"$1\" >> {tmp_path / 'opened'}\n")
    _script(bin_dir / "approve", f"#!/bin/sh\ncd {ROOT} && exec {sys.executable} -m tests.support.approve \"$@\"\n")
    config = AgentConfig(secret=SECRET, user=DesktopUser("browser", home), run_dir=run_dir, terminal=None,
                         opener=str(bin_dir / "opener"),
                         toolrun=(sys.executable, "-m", "browservm.guest.toolrun"),
                         path=f"{bin_dir}:/usr/bin:/bin")
    markers: list[str] = []
    agent = Agent(config, emit=markers.append)
    api = controller_server(agent, ("127.0.0.1", 0))
    opener = opener_server(agent, 0)
    write_opener_file(agent, opener)
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True) for s in (api, opener)]
    for thread in threads:
        thread.start()
    try:
        yield Running(agent, AgentClient("127.0.0.1", api.server_address[1], SECRET), home, bin_dir, markers)
    finally:
        agent.shutdown()
        for server in (api, opener):
            server.shutdown()
            server.server_close()


_DEVTOOLS_CLOSED = {"BROWSERVM_DEVTOOLS": "127.0.0.1:9", "BROWSERVM_CHROMIUM": "chromium-standin"}

OPENS_THEN_WAITS_THEN_WRITES = """
    import json, os, subprocess, sys
    print("fake: opening the browser", flush=True)
    url = "https://auth.example.test:8443/oauth/authorize?a=1&redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fcb"
    subprocess.run([os.environ["BROWSER"], url], check=True)
    print("fake: waiting for the person", flush=True)
    open(sys.argv[1]).read()  # a FIFO: returns when the test says the person approved
    path = sys.argv[2]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"access_token": "at-123", "refresh_token": "rt-456"}, f)
    print("fake: signed in", flush=True)
"""


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone for every purpose but its parent's bookkeeping.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_every_request_needs_the_secret_and_gets_401_otherwise(running: Running) -> None:
    client = running.client
    for secret in (None, "", "cd" * 32, SECRET + "0", f"{SECRET} "):
        for method, path in (("GET", "/v1/status"), ("POST", "/v1/login"), ("POST", "/v1/handover"),
                             ("POST", "/v1/cancel"), ("GET", "/nowhere")):
            answer = client.request(method, path, {"provider": "x"}, secret=secret)
            assert (answer.status, answer.body) == (401, {"error": "unauthorized"}), (secret, method, path)
    assert client.request("GET", "/v1/status").body == {
        "state": "idle", "provider": None, "auth_url_host": None, "exit_status": None, "output": [], "reason": None}


def test_a_login_goes_starting_waiting_captured_and_hands_over_exactly_once(running: Running, tmp_path: Path) -> None:
    fifo = tmp_path / "approve"
    os.mkfifo(fifo)
    creds = running.home / ".fake" / "creds.json"
    tool = running.tool("fake-login", OPENS_THEN_WAITS_THEN_WRITES)
    client = running.client
    assert client.request("POST", "/v1/handover").status == 409  # nothing captured yet

    answer = client.request("POST", "/v1/login", running.login([tool, str(fifo), str(creds)], env=_DEVTOOLS_CLOSED))
    assert (answer.status, answer.body) == (202, {"state": "starting"})
    waiting = client.wait_for(["waiting-for-user"], 30)
    assert waiting["state"] == "waiting-for-user" and waiting["auth_url_host"] == "auth.example.test:8443"
    assert client.request("POST", "/v1/login", running.login([tool])).status == 409  # one login at a time
    opened = (tmp_path / "opened").read_text().strip()
    assert opened.endswith("redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fcb")  # the URL as the tool gave it

    fifo.write_text("approved\n")
    captured = client.wait_for(["captured"], 30)
    assert captured["state"] == "captured", captured
    assert "fake: waiting for the person" in captured["output"]

    handover = client.request("POST", "/v1/handover")
    assert handover.status == 200
    files = {p: base64.b64decode(d) for p, d in handover.body["files"].items()}
    assert files == {str(creds): creds.read_bytes()}
    assert handover.body["sha256"] == credentials_digest(files)
    assert client.request("POST", "/v1/handover").status == 410
    assert client.request("POST", "/v1/handover").status == 410

    marker = next(m for m in running.markers if "captured" in m)
    assert marker == captured_marker("fake", 1, credentials_digest(files))
    assert marker.startswith("browservm-agent: captured provider=fake files=1 sha256=")
    topic, fields = parse_marker(marker) or ("", {})
    assert topic == "agent" and fields["sha256"] == handover.body["sha256"]
    assert not any("at-123" in m for m in running.markers)
    final = client.wait_for([], 10)  # the tool is stopped (or ended) and its exit status known
    assert final["state"] == "captured"


def test_an_earlier_logins_credentials_are_not_taken_for_this_ones(running: Running, tmp_path: Path) -> None:
    # A VM given to a second login still holds what the first one's tool wrote.
    fifo = tmp_path / "approve"
    os.mkfifo(fifo)
    creds = running.home / ".fake" / "creds.json"
    creds.parent.mkdir(parents=True)
    creds.write_text('{"access_token": "old", "refresh_token": "old"}')
    tool = running.tool("fake-login", OPENS_THEN_WAITS_THEN_WRITES)
    client = running.client
    answer = client.request("POST", "/v1/login", running.login([tool, str(fifo), str(creds)], env=_DEVTOOLS_CLOSED))
    assert answer.status == 202
    assert client.wait_for(["waiting-for-user"], 30)["state"] == "waiting-for-user"  # not captured at once
    assert not creds.exists()
    fifo.write_text("approved\n")
    assert client.wait_for(["captured"], 30)["state"] == "captured"
    handover = client.request("POST", "/v1/handover")
    assert json.loads(base64.b64decode(handover.body["files"][str(creds)]))["access_token"] == "at-123"


def test_the_digest_is_the_one_the_docstring_defines() -> None:
    files = {"/home/browser/b.json": b'{"b":1}', "/home/browser/a.json": b"{}"}
    expected = hashlib.sha256(b"/home/browser/a.json\n2\n{}" + b"/home/browser/b.json\n7\n" + b'{"b":1}').hexdigest()
    assert credentials_digest(files) == expected
    assert credentials_digest({"/a": b"x\n1\ny"}) != credentials_digest({"/a": b"x", "/a\n1\ny": b""})


def test_a_tool_that_exits_non_zero_is_failed_with_its_status_and_output(running: Running) -> None:
    tool = running.tool("fake-fail", """
        import sys
        for i in range(60):
            print(f"line {i}")
        print("fake: the provider said no", flush=True)
        sys.exit(7)
    """)
    status = drive_login(running.client, running.login([tool]), 30).status
    assert status["state"] == "failed" and status["exit_status"] == 7, status
    assert status["output"][-1] == "fake: the provider said no"
    assert len(status["output"]) == 40  # the last lines only
    assert "status 7" in status["reason"] and "missing" in status["reason"]
    assert running.client.request("POST", "/v1/handover").status == 409


def test_success_needs_every_required_key(running: Running) -> None:
    creds = running.home / ".fake" / "creds.json"
    tool = running.tool("fake-partial", f"""
        import json, os
        os.makedirs({str(creds.parent)!r}, exist_ok=True)
        json.dump({{"access_token": "x"}}, open({str(creds)!r}, "w"))
    """)
    status = drive_login(running.client, running.login([tool], required_keys=["access_token", "refresh_token"]),
                         30).status
    assert status["state"] == "failed" and status["exit_status"] == 0
    assert "lacks refresh_token" in status["reason"]


def test_a_credentials_file_reached_through_a_symlink_is_not_taken(running: Running, tmp_path: Path) -> None:
    secret_file = tmp_path / "elsewhere.json"
    secret_file.write_text('{"access_token": "not the tool\'s"}')
    creds = running.home / ".fake" / "creds.json"
    tool = running.tool("fake-link", f"""
        import os
        os.makedirs({str(creds.parent)!r}, exist_ok=True)
        os.symlink({str(secret_file)!r}, {str(creds)!r})
    """)
    status = drive_login(running.client, running.login([tool]), 30).status
    assert status["state"] == "failed", status


HANGS_WITH_A_CHILD = """
    import os, signal, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {child.pid}")
    print("fake: waiting forever", flush=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stubborn tool: only SIGKILL ends it
    signal.pause()
"""


def _await_file(path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        assert time.monotonic() < deadline, f"{path} never written"
        time.sleep(0.05)
    return path.read_text()


def test_the_deadline_times_out_and_kills_the_tools_whole_process_group(running: Running, tmp_path: Path) -> None:
    pids = tmp_path / "tool-pids"
    tool = running.tool("fake-hang", HANGS_WITH_A_CHILD)
    started = time.monotonic()
    status = drive_login(running.client, running.login([tool, str(pids)], timeout_s=2), 30).status
    assert status["state"] == "timed-out", status
    assert 2 <= time.monotonic() - started < 2 + 8
    assert "no credentials within 2 s" in status["reason"]
    assert "fake: waiting forever" in status["output"]
    assert all(_pid_gone(int(pid)) for pid in pids.read_text().split())


def test_cancel_kills_the_tools_process_group_and_says_cancelled(running: Running, tmp_path: Path) -> None:
    pids = tmp_path / "tool-pids"
    tool = running.tool("fake-hang", HANGS_WITH_A_CHILD)
    client = running.client
    assert client.request("POST", "/v1/cancel").status == 409  # nothing runs
    assert client.request("POST", "/v1/login", running.login([tool, str(pids)], timeout_s=600)).status == 202
    tool_pid, child_pid = (int(p) for p in _await_file(pids, 30).split())
    answer = client.request("POST", "/v1/cancel")
    assert (answer.status, answer.body) == (200, {"state": "cancelled"})
    assert _pid_gone(tool_pid) and _pid_gone(child_pid)
    assert client.status()["state"] == "cancelled"
    assert client.request("POST", "/v1/cancel").status == 409
    # A finished login may be followed by another.
    assert client.request("POST", "/v1/login", running.login([running.tool("t", "pass")])).status == 202
    assert client.wait_for([], 30)["state"] == "failed"


def test_a_tool_that_cannot_be_started_is_failed_with_the_runners_words(running: Running) -> None:
    status = drive_login(running.client, running.login(["/nonexistent/tool"]), 30).status
    assert status["state"] == "failed" and status["exit_status"] == 127
    assert any("cannot run /nonexistent/tool" in line for line in status["output"])


@pytest.mark.parametrize(("change", "words"), [
    ({"credentials": ["relative/creds.json"]}, "not an absolute path"),
    ({"credentials": ["/etc/shadow"]}, "not under the desktop user's home"),
    ({"credentials": ["HOME/../../etc/shadow"]}, "not a normalised path"),
    ({"credentials": ["HOME/a"] * 2}, "given twice"),
    ({"credentials": [f"HOME/{i}" for i in range(17)]}, "credentials: a list of 1 to 16"),
    ({"credentials": []}, "credentials: a list of 1 to 16"),
    ({"command": []}, "command: a list of 1 to 64"),
    ({"command": ["x"] * 65}, "command: a list of 1 to 64"),
    ({"command": ["a\0b"]}, "non-empty string"),
    ({"env": {"A B": "x"}}, "not a variable name"),
    ({"env": {f"V{i}": "x" for i in range(65)}}, "at most 64 variables"),
    ({"env": {"V": 1}}, "must be a string"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"timeout_s": 3601}, "timeout_s"),
    ({"timeout_s": True}, "timeout_s"),
    ({"provider": "a b"}, "provider"),
    ({"surprise": 1}, "unknown fields: surprise"),
])
def test_what_a_login_may_ask_is_bounded(running: Running, change: dict[str, Any], words: str) -> None:
    body = running.login(["/bin/true"])
    body.update(json.loads(json.dumps(change).replace("HOME", str(running.home))))
    answer = running.client.request("POST", "/v1/login", body)
    assert answer.status == 422 and words in answer.body["error"], answer
    assert running.client.status()["state"] == "idle"


def test_a_body_over_64_kib_is_refused_unread(running: Running) -> None:
    answer = running.client.request("POST", "/v1/login", raw=b"{" + b" " * (64 * 1024) + b"}")
    assert answer.status == 413
    assert running.client.request("POST", "/v1/login", raw=b"not json").status == 400


def test_the_opener_channel_needs_its_own_token(running: Running) -> None:
    opener_file = json.loads((running.agent.config.run_dir / "opener.json").read_text())
    port = int(opener_file["url"].rsplit(":", 1)[1].split("/")[0])
    channel = AgentClient("127.0.0.1", port, opener_file["token"])
    assert channel.request("POST", "/v1/opened", {"url": "https://x.test/"}, secret=SECRET).status == 401
    assert channel.request("POST", "/v1/opened", {"url": "https://x.test/"}).status == 409  # no login runs
    assert opener_file["url"].startswith("http://127.0.0.1:")


def test_a_whole_login_with_the_sample_tool_and_a_real_authorization_server(running: Running) -> None:
    creds = str(running.home / ".sample" / "credentials.json")
    with listen(approve="button") as server:
        login = {"provider": "sample", "command": [
            sys.executable, "-m", "browservm.guest.sample_login", "--issuer", server.issuer, "--credentials", creds],
            "env": {"BROWSERVM_DEVTOOLS": "127.0.0.1:9", "BROWSERVM_CHROMIUM": "approve",
                    "PYTHONPATH": str(ROOT / "src")},
            "credentials": [creds], "required_keys": ["access_token", "refresh_token"], "timeout_s": 60}
        result = drive_login(running.client, login, 60)
    assert result.status["state"] == "captured", result.status
    assert result.status["auth_url_host"] == server.issuer.removeprefix("http://")
    document = json.loads(result.files[creds])
    assert (document["access_token"], document["refresh_token"]) == (server.access_token, server.refresh_token)
    assert server.record.consent_pages == 1 and server.record.tokens_issued == 1
    assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600


def test_a_new_key_on_the_config_disk_works_at_once_and_the_old_one_stops(tmp_path: Path) -> None:
    """A pooled VM's claim (vm/pool.py): the host rewrites the config disk under the running agent."""
    disk = tmp_path / "vdc"
    configdisk.write(disk, {"vm_id": "vm-1", "secrets": {"agent": SECRET, "vnc": "abcdefgh"}})
    config = AgentConfig(secret=read_secret(disk), user=DesktopUser("browser", tmp_path), run_dir=tmp_path / "run",
                         terminal=None, config_disk=disk)
    agent = Agent(config)
    api = controller_server(agent, ("127.0.0.1", 0))
    threading.Thread(target=api.serve_forever, args=(0.05,), daemon=True).start()
    port = api.server_address[1]
    try:
        assert AgentClient("127.0.0.1", port, SECRET).request("GET", "/v1/status").status == 200
        new = "ef" * 32
        configdisk.rewrite(disk, {"vm_id": "vm-1", "secrets": {"agent": new, "vnc": "abcdefgh"}})
        # The old key stops before anyone used the new one (a clone's agent still holds its snapshot's).
        assert AgentClient("127.0.0.1", port, SECRET).request("GET", "/v1/status").status == 401
        assert AgentClient("127.0.0.1", port, new).request("GET", "/v1/status").status == 200
        configdisk.rewrite(disk, {"vm_id": "vm-1", "secrets": {"vnc": "abcdefgh"}})  # unreadable: keep the key
        assert AgentClient("127.0.0.1", port, SECRET).request("GET", "/v1/status").status == 401
        assert AgentClient("127.0.0.1", port, new).request("GET", "/v1/status").status == 200
    finally:
        agent.shutdown()
        api.shutdown()
        api.server_close()


def test_the_secret_comes_from_the_config_disk(tmp_path: Path) -> None:
    disk = tmp_path / "vdc"
    configdisk.write(disk, {"vm_id": "vm-1", "secrets": {"agent": SECRET, "vnc": "abcdefgh"}})
    assert read_secret(disk) == SECRET
    bad = tmp_path / "bad"
    configdisk.write(bad, {"vm_id": "vm-1", "secrets": {"vnc": "abcdefgh"}})
    with pytest.raises(configdisk.ConfigDiskError, match="no agent secret"):
        read_secret(bad)
