"""What a controller may ask the agent to run (POST /v1/login), checked before anything runs.

Bounds: 64 command words, 64 environment variables, 16 credentials files (absolute, normalised,
under the desktop user's home), 64 required keys, a timeout of 1 to 3600 s, each word at most
4096 characters. Stdlib-only: it runs in the guest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_WORDS = 64
MAX_WORD = 4096
MAX_ENV = 64
MAX_FILES = 16
MAX_KEYS = 64
MAX_TIMEOUT_S = 3600
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class LoginRequest:
    provider: str
    command: tuple[str, ...]
    env: dict[str, str]
    credentials: tuple[str, ...]
    required_keys: tuple[str, ...]
    timeout_s: float

    @classmethod
    def parse(cls, body: Any, home: Path) -> LoginRequest:
        if not isinstance(body, dict):
            raise BadRequest("the body is not a JSON object")
        unknown = set(body) - {"provider", "command", "env", "credentials", "required_keys", "timeout_s"}
        if unknown:
            raise BadRequest(f"unknown fields: {', '.join(sorted(unknown))}")
        provider = body.get("provider")
        if not isinstance(provider, str) or re.fullmatch(r"[A-Za-z0-9._-]{1,64}", provider) is None:
            raise BadRequest("provider: 1-64 letters, digits, '.', '_', '-'")
        command = _strings(body.get("command"), "command", MAX_WORDS, minimum=1)
        env_value = body.get("env", {})
        if not isinstance(env_value, dict) or len(env_value) > MAX_ENV:
            raise BadRequest(f"env: an object of at most {MAX_ENV} variables")
        env: dict[str, str] = {}
        for name, value in env_value.items():
            if _ENV_NAME.fullmatch(name) is None or len(name) > 128:
                raise BadRequest(f"env: {name[:64]!r} is not a variable name")
            if not isinstance(value, str) or len(value) > MAX_WORD or "\0" in value:
                raise BadRequest(f"env: {name} must be a string of at most {MAX_WORD} characters")
            env[name] = value
        credentials = _strings(body.get("credentials"), "credentials", MAX_FILES, minimum=1)
        for path in credentials:
            _check_credentials_path(path, home)
        if len(set(credentials)) != len(credentials):
            raise BadRequest("credentials: a path is given twice")
        required = _strings(body.get("required_keys", []), "required_keys", MAX_KEYS, minimum=0)
        timeout = body.get("timeout_s")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 1 <= timeout <= MAX_TIMEOUT_S:
            raise BadRequest(f"timeout_s: a number of seconds from 1 to {MAX_TIMEOUT_S}")
        return cls(provider, command, env, credentials, required, float(timeout))


def _strings(value: Any, name: str, most: int, minimum: int) -> tuple[str, ...]:
    if not isinstance(value, list) or not minimum <= len(value) <= most:
        raise BadRequest(f"{name}: a list of {minimum} to {most} strings")
    for item in value:
        if not isinstance(item, str) or not item or len(item) > MAX_WORD or "\0" in item:
            raise BadRequest(f"{name}: each item a non-empty string of at most {MAX_WORD} characters")
    return tuple(value)


def _check_credentials_path(path: str, home: Path) -> None:
    if not path.startswith("/"):
        raise BadRequest(f"credentials: {path[:200]!r} is not an absolute path")
    if os.path.normpath(path) != path or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise BadRequest(f"credentials: {path[:200]!r} is not a normalised path")
    if not path.startswith(str(home).rstrip("/") + "/"):
        raise BadRequest(f"credentials: {path[:200]!r} is not under the desktop user's home {home}")
