"""browservm-sample-login: a CLI tool's browser login, as the real ones do it, for the `sample` provider.

    browservm-sample-login --issuer URL --credentials PATH [--port 1455 | --port 0] [--client-id ID]

1. Reads the authorization server's metadata (RFC 8414, `<issuer>/.well-known/oauth-authorization-server`).
2. Opens a loopback listener on 127.0.0.1: a fixed port (`--port 1455`, like Codex CLI) or one the
   kernel picks (`--port 0`, the default, like Claude Code and Gemini CLI); the redirect URI is
   `http://127.0.0.1:PORT/callback` (RFC 8252: loopback IP literal, any port).
3. Builds an authorization-code request with PKCE S256 (RFC 7636: a 64-character verifier, its
   SHA-256 in base64url as the challenge) and a random `state`, and opens it with `$BROWSER`.
4. Receives the code on its listener (checking `state`), tells the browser it may close the page,
   exchanges the code and the verifier at the token endpoint, and writes the token response (plus
   `issuer` and `obtained_at`) as JSON to PATH, mode 0600 from the start, replaced whole by rename.
5. Says what it does on stdout, never a token, and exits 0; on any error it says why and exits 1.
   `--fail` makes it stop with status 3 after its first lines (the tests' failure path).

Stdlib-only: it runs in the guest.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import secrets
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

CODEX_LIKE_PORT = 1455
_HTTP_TIMEOUT_S = 15.0
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the issuer is never behind a proxy


class LoginError(Exception):
    pass


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge) per RFC 7636 section 4.1-4.2."""
    verifier = secrets.token_urlsafe(48)  # 64 characters of [A-Za-z0-9_-]
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest()).rstrip(b"=").decode()
    return verifier, challenge


def _get_json(url: str, data: dict[str, str] | None = None) -> Any:
    body = None if data is None else urlencode(data).encode()
    request = urllib.request.Request(url, data=body, headers={  # noqa: S310 - the issuer's http(s) URL
        "Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with _DIRECT.open(request, timeout=_HTTP_TIMEOUT_S) as response:
            return json.loads(response.read(1024 * 1024))
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read(65536))
            reason = f"{detail.get('error')}: {detail.get('error_description', '')}".rstrip(": ")
        except ValueError:
            reason = exc.reason
        raise LoginError(f"{url} answered {exc.code} ({reason})") from None
    except (OSError, ValueError) as exc:
        raise LoginError(f"{url}: {getattr(exc, 'reason', exc)}") from None


@dataclass
class Callback:
    code: str | None = None
    error: str | None = None


class _CallbackHandler(BaseHTTPRequestHandler):
    server: _CallbackServer
    timeout = _HTTP_TIMEOUT_S  # a connection that sends nothing must not hold the login

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path != "/callback":
            self.send_error(404)
            return
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if query.get("state") != self.server.expected_state:
            self.server.result.error = "the callback's state does not match the request's"
        elif "error" in query:
            self.server.result.error = f"{query['error']}: {query.get('error_description', '')}".rstrip(": ")
        elif not query.get("code"):
            self.server.result.error = "the callback carries no code"
        else:
            self.server.result.code = query["code"]
        ok = self.server.result.code is not None
        page = ("<!doctype html><title>Signed in</title><h1>Signed in</h1><p>You can close this page.</p>" if ok
                else "<!doctype html><title>Sign-in failed</title><h1>Sign-in failed</h1>")
        data = page.encode()
        self.send_response(200 if ok else 400)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _CallbackServer(HTTPServer):
    def __init__(self, port: int, expected_state: str) -> None:
        self.expected_state = expected_state
        self.result = Callback()
        super().__init__(("127.0.0.1", port), _CallbackHandler)


def _open_browser(url: str) -> subprocess.Popen[bytes] | None:
    """Start `$BROWSER URL` and return at once: the page comes back to our listener, which must be serving."""
    browser = os.environ.get("BROWSER", "")
    if not browser:
        print(f"Open this page in a browser to sign in:\n  {url}", flush=True)
        return None
    argv = shlex.split(browser.split(":")[0])  # BROWSER may list commands separated by ':'
    argv = [word.replace("%s", url) for word in argv] if any("%s" in w for w in argv) else [*argv, url]
    print(f"Opening the sign-in page with {argv[0]}", flush=True)
    try:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    except OSError as exc:
        print(f"cannot run {argv[0]} ({exc.strerror}); open this page yourself:\n  {url}", flush=True)
        return None


def _reap(browser: subprocess.Popen[bytes] | None) -> None:
    """Collect the opener's exit status if it has one by now; one still running is left to itself."""
    if browser is None:
        return
    try:
        status = browser.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return
    if status != 0:
        print(f"(the browser command exited with status {status})", flush=True)


def write_credentials(path: Path, document: dict[str, Any]) -> None:
    """Mode 0600 from creation, replaced whole: no reader sees a half-written or world-readable file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(document, indent=2).encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)


def login(issuer: str, credentials: Path, port: int, client_id: str, scope: str, timeout: float,  # noqa: PLR0917
          fail: bool = False) -> None:
    print(f"sample-login: signing in to {issuer}", flush=True)
    metadata = _get_json(issuer.rstrip("/") + "/.well-known/oauth-authorization-server")
    try:
        authorize, token_endpoint = metadata["authorization_endpoint"], metadata["token_endpoint"]
    except (KeyError, TypeError):
        raise LoginError("the issuer's metadata names no authorization or token endpoint") from None
    if "S256" not in metadata.get("code_challenge_methods_supported", []):
        raise LoginError("the issuer does not support PKCE S256")
    if fail:
        print("sample-login: stopping here on purpose (--fail)", flush=True)
        raise SystemExit(3)
    state = secrets.token_urlsafe(24)
    try:
        server = _CallbackServer(port, state)
    except OSError as exc:
        raise LoginError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None
    with server:
        redirect_uri = f"http://127.0.0.1:{server.server_address[1]}/callback"
        print(f"Waiting for the sign-in on {redirect_uri}", flush=True)
        verifier, challenge = pkce_pair()
        query = urlencode({"response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
                           "scope": scope, "state": state, "code_challenge": challenge,
                           "code_challenge_method": "S256"})
        browser = _open_browser(f"{authorize}?{query}")
        deadline = time.monotonic() + timeout
        while server.result.code is None and server.result.error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoginError(f"no sign-in within {timeout:g} s")
            server.timeout = remaining
            server.handle_request()
    _reap(browser)
    if server.result.error is not None:
        raise LoginError(f"the sign-in was refused: {server.result.error}")
    print("Received the authorization code; exchanging it for tokens", flush=True)
    tokens = _get_json(token_endpoint, {"grant_type": "authorization_code", "code": server.result.code or "",
                                        "redirect_uri": redirect_uri, "client_id": client_id,
                                        "code_verifier": verifier})
    if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
        raise LoginError("the token endpoint's answer has no access_token")
    write_credentials(credentials, {**tokens, "issuer": issuer, "obtained_at": int(time.time())})
    print(f"Signed in. Credentials written to {credentials}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-sample-login", description=__doc__.splitlines()[0])
    parser.add_argument("--issuer", required=True, help="the authorization server's issuer URL")
    parser.add_argument("--credentials", type=Path, default=Path.home() / ".sample" / "credentials.json")
    parser.add_argument("--port", type=int, default=0, help=f"loopback port: {CODEX_LIKE_PORT} fixed, 0 any")
    parser.add_argument("--client-id", default="browservm-sample")
    parser.add_argument("--scope", default="profile")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the sign-in")
    parser.add_argument("--fail", action="store_true", help="exit 3 after the first lines")
    args = parser.parse_args(argv)
    if urlsplit(args.issuer).scheme not in ("http", "https"):
        parser.error("--issuer must be an http(s) URL")
    try:
        login(args.issuer, args.credentials, args.port, args.client_id, args.scope, args.timeout, args.fail)
    except LoginError as exc:
        print(f"sample-login: error: {exc}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
