"""The `sample` provider's tool against the tests' real authorization server (authlib) on loopback.

The person's part is played by tests/support/approve.py as `$BROWSER`: it loads the consent page,
presses Approve and follows the redirect to the tool's loopback listener, as a browser would.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from browservm.guest.sample_login import pkce_pair
from tests.support.oauth_server import TestAuthorizationServer, listen

ROOT = Path(__file__).resolve().parents[2]
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_tool(issuer: str, credentials: Path, *extra: str, browser: str | None = None,
             ) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    env["BROWSER"] = browser if browser is not None else f"{sys.executable} -m tests.support.approve"
    return subprocess.run([sys.executable, "-m", "browservm.guest.sample_login", "--issuer", issuer,
                           "--credentials", str(credentials), "--timeout", "60", *extra],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=90, check=False)


@pytest.mark.parametrize("mode", ["random", "fixed"])
def test_the_tool_signs_in_with_pkce_on_its_loopback_listener(tmp_path: Path, mode: str) -> None:
    port = _free_port() if mode == "fixed" else 0
    credentials = tmp_path / "home" / ".sample" / "credentials.json"
    with listen(approve="button", access_token="at-known", refresh_token="rt-known") as server:
        done = run_tool(server.issuer, credentials, "--port", str(port))
    assert done.returncode == 0, done.stdout + done.stderr
    listening = next(line for line in done.stdout.splitlines() if line.startswith("Waiting for the sign-in on"))
    used = int(listening.rsplit(":", 1)[1].split("/")[0])
    assert used == port if mode == "fixed" else used > 0
    document = json.loads(credentials.read_text())
    assert (document["access_token"], document["refresh_token"]) == ("at-known", "rt-known")
    assert document["issuer"] == server.issuer and document["token_type"] == "Bearer"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE(credentials.parent.stat().st_mode) == 0o700
    assert server.record.consent_pages == 1 and server.record.tokens_issued == 1 and not server.record.token_errors
    assert len(server.record.challenges[0]) == 43  # an S256 challenge: 32 bytes in base64url
    assert "at-known" not in done.stdout + done.stderr  # the tool never prints a token


def test_the_server_checks_the_pkce_verifier(tmp_path: Path) -> None:
    """The tool's verifier is what the server verifies: a wrong one gets invalid_grant, the code stays unusable."""
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    with listen(approve="auto") as server:
        redirect = "http://127.0.0.1:4321/callback"
        query = urllib.parse.urlencode({"response_type": "code", "client_id": "browservm-sample", "state": "s",
                                        "scope": "profile", "redirect_uri": redirect, "code_challenge": challenge,
                                        "code_challenge_method": "S256"})
        code = _code_from_redirect(server, f"{server.issuer}/authorize?{query}")
        wrong = _token(server, code, redirect, "x" * 64)
        assert wrong[0] == 400 and wrong[1]["error"] == "invalid_grant"
        right = _token(server, code, redirect, verifier)
        assert right[0] == 200 and right[1]["access_token"] == server.access_token
        again = _token(server, code, redirect, verifier)
        assert again[0] == 400  # a code is used once


def _code_from_redirect(server: TestAuthorizationServer, url: str) -> str:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), NoRedirect())
    with pytest.raises(urllib.error.HTTPError) as caught:
        opener.open(url, timeout=10)
    assert caught.value.code == 302
    location = caught.value.headers["Location"]
    assert "code=" in location, location
    return urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]


def _token(server: TestAuthorizationServer, code: str, redirect: str, verifier: str) -> tuple[int, dict[str, str]]:
    data = urllib.parse.urlencode({"grant_type": "authorization_code", "code": code, "redirect_uri": redirect,
                                   "client_id": "browservm-sample", "code_verifier": verifier}).encode()
    try:
        with _DIRECT.open(f"{server.issuer}/token", data=data, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_a_redirect_that_is_not_loopback_is_refused(tmp_path: Path) -> None:
    _, challenge = pkce_pair()
    with listen(approve="auto") as server:
        query = urllib.parse.urlencode({"response_type": "code", "client_id": "browservm-sample",
                                        "redirect_uri": "http://evil.example/callback", "code_challenge": challenge,
                                        "code_challenge_method": "S256"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            _DIRECT.open(f"{server.issuer}/authorize?{query}", timeout=10)
        assert caught.value.code == 400
        assert server.record.codes_issued == []


def test_fail_switch_exits_3_with_its_words(tmp_path: Path) -> None:
    with listen() as server:
        done = run_tool(server.issuer, tmp_path / "c.json", "--fail")
    assert done.returncode == 3
    assert "stopping here on purpose (--fail)" in done.stdout
    assert not (tmp_path / "c.json").exists()


def test_a_fixed_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy, listen() as server:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        done = run_tool(server.issuer, tmp_path / "c.json", "--port", str(busy.getsockname()[1]))
    assert done.returncode == 1
    assert "cannot listen on 127.0.0.1:" in done.stdout and "Address already in use" in done.stdout


def test_an_unreachable_issuer_is_a_clear_error(tmp_path: Path) -> None:
    done = run_tool(f"http://127.0.0.1:{_free_port()}", tmp_path / "c.json")
    assert done.returncode == 1 and "sample-login: error:" in done.stdout and "refused" in done.stdout


def test_a_person_who_denies_gets_a_failed_login(tmp_path: Path) -> None:
    # A browser that presses nothing but follows a denial: POST /authorize without approve=1.
    denier = tmp_path / "deny.py"
    denier.write_text(
        "import re, sys, urllib.parse, urllib.request\n"
        "o = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "page = o.open(sys.argv[1]).read().decode()\n"
        "fields = dict(re.findall(r'type=\"hidden\" name=\"([^\"]*)\" value=\"([^\"]*)\"', page))\n"
        "try:\n"
        "    o.open(sys.argv[1].split('?')[0], data=urllib.parse.urlencode(fields).encode())\n"
        "except Exception:\n"
        "    pass\n")
    with listen() as server:
        done = run_tool(server.issuer, tmp_path / "c.json", browser=f"{sys.executable} {denier}")
    assert done.returncode == 1 and "access_denied" in done.stdout, done.stdout
    assert not (tmp_path / "c.json").exists()
