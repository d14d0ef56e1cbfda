"""browservm-opener: what a login tool runs as `$BROWSER URL` (and as `xdg-open URL`).

It opens URL in the desktop's running Chromium and tells the agent, so the agent's state becomes
`waiting-for-user` with the URL's host:

1. Chromium: the desktop supervisor starts it with `--remote-debugging-port=9222`; the DevTools
   HTTP endpoint `PUT /json/new?<url>` opens a tab (the URL goes percent-encoded whole: Chromium
   decodes the query once, so the tool's own encoding survives), and `/json/activate/<id>` brings
   it, and its window, to the front (the person, or a test's key press over VNC, must land on the
   page, not on the terminal). Where DevTools does not answer, `chromium URL` hands the URL to the
   running instance (or starts one).
2. The agent: `POST <url>` with `{"url": URL}` and the bearer token from the opener file the agent
   wrote (`/run/browservm-agent/opener.json`, readable by root and the desktop user's group only;
   `BROWSERVM_OPENER` names another). A failure to tell the agent is reported on stderr but does not
   fail the tool's login: the page is open.

Exit status 0 once the page is open; 1 (with the reason on stderr) when it could not be.
Stdlib-only: it runs in the guest.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

DEFAULT_OPENER_FILE = Path("/run/browservm-agent/opener.json")
DEFAULT_DEVTOOLS = "127.0.0.1:9222"
_TIMEOUT_S = 5.0
# Never through a proxy: every address here is the VM's own loopback.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OpenFailed(Exception):
    pass


def _request(method: str, url: str, body: dict[str, Any] | None = None,
             headers: dict[str, str] | None = None) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={  # noqa: S310 - http to loopback only
        "Content-Type": "application/json", **(headers or {})})
    with _DIRECT.open(request, timeout=_TIMEOUT_S) as response:
        payload: bytes = response.read(65536)
    return payload


def open_in_chromium(url: str, devtools: str = DEFAULT_DEVTOOLS, chromium: str = "chromium") -> str:
    """Open `url` in a new tab of the running Chromium and bring it to the front; how it was done."""
    try:
        target = json.loads(_request("PUT", f"http://{devtools}/json/new?{quote(url, safe='')}"))
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
    else:
        # The tab is open: from here on nothing may open it a second time.
        if isinstance(target, dict) and isinstance(target.get("id"), str):
            with contextlib.suppress(OSError):  # answers "Target activated" (text, whatever its type says)
                _request("GET", f"http://{devtools}/json/activate/{quote(target['id'], safe='')}")
        return "devtools"
    try:
        # Chromium hands the URL to the instance already running for this user and returns; when none
        # runs, this one stays, so it is not waited for.
        subprocess.Popen([chromium, url], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        raise OpenFailed(f"DevTools at {devtools}: {reason}; {chromium}: {exc.strerror}") from None
    return "chromium"


def tell_agent(url: str, opener_file: Path) -> None:
    try:
        config = json.loads(opener_file.read_text())
        endpoint, token = config["url"], config["token"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OpenFailed(f"cannot read {opener_file}: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(endpoint, str) or not endpoint.startswith("http://127.0.0.1:"):
        raise OpenFailed(f"{opener_file} names no loopback address")
    try:
        _request("POST", endpoint, {"url": url}, {"Authorization": f"Bearer {token}"})
    except urllib.error.HTTPError as exc:
        raise OpenFailed(f"the agent answered {exc.code}") from None
    except (OSError, ValueError) as exc:
        raise OpenFailed(f"the agent did not answer: {getattr(exc, 'reason', exc)}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        sys.stderr.write("usage: browservm-opener URL\n")
        return 2
    url = args[0]
    try:
        how = open_in_chromium(url, os.environ.get("BROWSERVM_DEVTOOLS", DEFAULT_DEVTOOLS),
                               os.environ.get("BROWSERVM_CHROMIUM", "chromium"))
    except OpenFailed as exc:
        sys.stderr.write(f"browservm-opener: cannot open the page: {exc}\n")
        return 1
    sys.stderr.write(f"browservm-opener: opened {urlsplit(url).netloc or url[:60]} in Chromium ({how})\n")
    if urlsplit(url).scheme in ("http", "https"):
        try:
            tell_agent(url, Path(os.environ.get("BROWSERVM_OPENER", str(DEFAULT_OPENER_FILE))))
        except OpenFailed as exc:
            sys.stderr.write(f"browservm-opener: the page is open, but the agent was not told: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
