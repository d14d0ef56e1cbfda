"""Secrets the controller keeps in its state directory: the operator's API key and the key that
signs viewer tokens. Made at the first start, readable by root alone (0600), never logged.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from browservm.errors import StateError
from browservm.secretfile import read_or_create

API_KEY_FILE = "api.key"
SIGNING_KEY_FILE = "viewer-signing.key"


def load_or_create(path: Path, make: str) -> str:
    """The secret in `path`, or `make` written there (mode 0600, created exclusively) when there is none;
    never through a link, never in a directory another user controls (secretfile.py)."""
    secret = read_or_create(path, make, "the key").strip()
    if not secret:
        raise StateError(str(path), "is empty; delete it to have a new key made")
    return secret


def api_key(state_dir: Path, given: str | None = None) -> tuple[str, Path | None]:
    """The operator's API key: the one given in settings, else the state directory's (made if missing)."""
    if given:
        return given, None
    path = state_dir / API_KEY_FILE
    return load_or_create(path, secrets.token_urlsafe(32)), path


def signing_key(state_dir: Path) -> bytes:
    return bytes.fromhex(load_or_create(state_dir / SIGNING_KEY_FILE, secrets.token_hex(32)))
