"""The controller's client of the guest's profile keeper (guest/profile_keeper.py): port 7002, the VM's
agent key, raw bodies (the sealed profile). A failure is a ProbeFailed naming its hop:

    profile.connect   no TCP connection to the keeper (net.tcp's reason)
    profile.auth      the keeper refused the VM's key (401)
    profile.protocol  an answer that is not the keeper's: malformed, too large, too slow
    profile.load      the keeper could not put the profile in place (its words: a seal that does not open,
                      an archive it refused, Chromium not starting again)
    profile.save      the keeper could not pack or seal the profile (its words)
"""

from __future__ import annotations

import json

from browservm.errors import ProbeFailed
from browservm.vm.guest_http import GuestEndpoint, GuestHttp

LOAD = "profile.load"
SAVE = "profile.save"
# Stopping Chromium, unpacking and starting it again, under software emulation.
LOAD_DEADLINE_S = 180.0
SAVE_DEADLINE_S = 180.0


def _error(kind: str, reason: str) -> ProbeFailed:
    return ProbeFailed(f"profile.{kind}", reason)


class KeeperClient:
    def __init__(self, endpoint: GuestEndpoint, token: str, timeout: float = 5.0) -> None:
        self._http = GuestHttp(endpoint, token, timeout, _error,
                               "the profile keeper refused this VM's key (401): the VM's config disk is not the "
                               "one it booted with")

    async def load(self, sealed: bytes, key: bytes, bound_to: bytes) -> int:
        """Put the sealed profile (b"": a new one) in place and Chromium running with it; the files it holds."""
        status, body = await self._http.request("POST", "/v1/profile/load", sealed, limit=64 * 1024,
                                                timeout=LOAD_DEADLINE_S, headers=_secret(key, bound_to),
                                                content_type="application/octet-stream")
        answer = _json(body)
        if status != 200:
            raise ProbeFailed(LOAD, f"the keeper answered {status}: {_said(answer)}")
        files = answer.get("files") if isinstance(answer, dict) else None
        if not isinstance(files, int) or isinstance(files, bool):
            raise ProbeFailed("profile.protocol", "the keeper's answer to a load has no number of files")
        return files

    async def save(self, key: bytes, bound_to: bytes, limit: int) -> bytes:
        """The profile sealed by the guest, at most `limit` bytes; Chromium is down afterwards."""
        headers = {**_secret(key, bound_to), "X-Profile-Limit": str(limit)}
        status, body = await self._http.request("POST", "/v1/profile/save", b"", limit=limit,
                                                timeout=SAVE_DEADLINE_S, headers=headers,
                                                content_type="application/octet-stream")
        if status != 200:
            raise ProbeFailed(SAVE, f"the keeper answered {status}: {_said(_json(body))}")
        return body


def _secret(key: bytes, bound_to: bytes) -> dict[str, str]:
    return {"X-Profile-Key": key.hex(), "X-Profile-Binding": bound_to.hex()}


def _json(body: bytes) -> object:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


def _said(answer: object) -> str:
    said = answer.get("error") if isinstance(answer, dict) else None
    # The guest wrote it: cut, and only printable.
    return "".join(c for c in str(said)[:300] if c.isprintable()) if said else "no reason given"
