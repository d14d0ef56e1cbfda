"""The opener against a real Chromium (Debian's, head-less here, with the desktop's DevTools switch) and a
real agent channel: the tab opens on exactly the URL the tool gave, and the agent learns the host."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from browservm.guest import opener
from browservm.guest.agent import Agent, AgentConfig, DesktopUser, opener_server, write_opener_file
from browservm.guest.agent_request import LoginRequest

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (scripts/install.sh)")
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def chromium(tmp_path: Path) -> Iterator[str]:
    """A Chromium with DevTools on a port it picks; yields host:port once it says it listens."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless=new", "--remote-debugging-port=0", f"--user-data-dir={tmp_path / 'profile'}",
            "--no-first-run", "--disable-gpu", "--disable-background-networking", "about:blank"]
    if os.geteuid() == 0:
        argv.insert(1, "--no-sandbox")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stderr is not None
    try:
        address = None
        readable, _, _ = select.select([proc.stderr], [], [], 60)
        for raw in proc.stderr if readable else []:
            line = raw.decode(errors="replace")
            if "DevTools listening on ws://" in line:
                address = line.split("ws://", 1)[1].split("/", 1)[0]
                break
        assert address is not None, "Chromium did not say where DevTools listens"
        yield address
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def _tabs(devtools: str) -> list[str]:
    with _DIRECT.open(f"http://{devtools}/json/list", timeout=10) as response:
        return [t["url"] for t in json.loads(response.read()) if t.get("type") == "page"]


def _has_tab(devtools: str, url: str, timeout: float = 15.0) -> bool:
    """Whether a tab shows `url` within `timeout`: a new tab lists an empty URL until it commits one."""
    deadline = time.monotonic() + timeout
    while url not in (tabs := _tabs(devtools)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return bool(tabs)


def test_the_url_opens_in_a_tab_exactly_as_the_tool_gave_it(chromium: str) -> None:
    url = ("http://127.0.0.1:9/authorize?response_type=code&redirect_uri=http%3A%2F%2F127.0.0.1%3A1455%2Fauth%2F"
           "callback&scope=openid%20profile&state=a%26b")
    assert opener.open_in_chromium(url, chromium) == "devtools"
    assert _has_tab(chromium, url)


def test_without_devtools_the_url_goes_to_the_chromium_command(tmp_path: Path) -> None:
    record = tmp_path / "given"
    standin = tmp_path / "chromium"
    standin.write_text(f"#!/bin/sh\necho \"$1\" > {record}.new && mv {record}.new {record}\n")
    standin.chmod(0o755)
    assert opener.open_in_chromium("https://example.test/a?b=c", "127.0.0.1:9", str(standin)) == "chromium"
    # The command is not waited for (it may become the browser); the file appears when it ran.
    done = subprocess.run(["timeout", "10", "sh", "-c", f"while [ ! -e {record} ]; do sleep 0.05; done"],
                          check=False)
    assert done.returncode == 0 and record.read_text().strip() == "https://example.test/a?b=c"
    with pytest.raises(opener.OpenFailed, match="nonexistent"):
        opener.open_in_chromium("https://example.test/", "127.0.0.1:9", "/nonexistent/chromium")


def test_the_opener_tells_the_agent_which_host_to_expect(chromium: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    agent = Agent(AgentConfig(secret="ab" * 32, user=DesktopUser("browser", home), run_dir=tmp_path / "run",
                              terminal=None, toolrun=(sys.executable, "-m", "browservm.guest.toolrun")),
                  emit=lambda line: None)
    server = opener_server(agent, 0)
    opener_file = write_opener_file(agent, server)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        request = LoginRequest.parse({"provider": "p", "command": ["sleep", "60"], "credentials": [f"{home}/c.json"],
                                      "timeout_s": 60}, home)
        assert agent.login(request)[0] == 202
        env = {**os.environ, "BROWSERVM_OPENER": str(opener_file), "BROWSERVM_DEVTOOLS": chromium}
        done = subprocess.run([sys.executable, "-m", "browservm.guest.opener",
                               "https://accounts.example.test/o/oauth2/auth?x=1"], env=env, capture_output=True,
                              text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        status = agent.status()
        assert (status["state"], status["auth_url_host"]) == ("waiting-for-user", "accounts.example.test")
        assert _has_tab(chromium, "https://accounts.example.test/o/oauth2/auth?x=1")
        agent.cancel()
    finally:
        server.shutdown()
        server.server_close()


def test_a_wrong_token_or_no_agent_leaves_the_page_open_and_says_so(tmp_path: Path) -> None:
    opener_file = tmp_path / "opener.json"
    opener_file.write_text(json.dumps({"url": "http://127.0.0.1:9/v1/opened", "token": "x"}))
    with pytest.raises(opener.OpenFailed, match="did not answer"):
        opener.tell_agent("https://x.test/", opener_file)
    opener_file.write_text(json.dumps({"url": "http://10.0.0.1:7001/v1/opened", "token": "x"}))
    with pytest.raises(opener.OpenFailed, match="no loopback"):
        opener.tell_agent("https://x.test/", opener_file)
    with pytest.raises(opener.OpenFailed, match="cannot read"):
        opener.tell_agent("https://x.test/", tmp_path / "missing.json")
