"""What of a login tool's output a login record may keep: nothing of a credential, on any path.

The tool runs in the VM and its last lines go into the login record, which the API shows; a tool
may print a token, or a piece of one ("token sk-ant-oat01-AbCd…"). So, before anything is kept:

- a line sharing SHARED or more characters in a row with a secret the controller knows is replaced
  whole by REDACTED. Known secrets: every string value (and, outside JSON, every word) of the
  captured credential files, and the login VM's own agent key and VNC password, which the controller
  holds on every path (one shorter than SHARED, the 8-character VNC password, is looked for
  whole): a failed, timed-out or cancelled login has no captured files, but its output is
  redacted too;
- anything shaped like a token (a run of TOKEN_CHARS or more URL-safe characters with letters and
  digits: OAuth access and refresh tokens, JWTs, API keys), in any line that is kept, is masked in
  place with MASK: a failed tool's output may print the token it could not write, which the
  controller never saw.

Whole lines for known secrets (a line may split one), runs for shapes (the rest of a failure's line
is what a person needs to see).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

SHARED = 12  # characters in a row a line must share with a known secret to be dropped
SHORTEST = 8  # a known secret shorter than SHARED (a VNC password) is looked for whole; none is shorter
TOKEN_CHARS = 24  # the shortest run counted as token-shaped
REDACTED = "[redacted: it held a credential]"
MASK = "[redacted]"

# URL-safe base64 and the separators tokens use ("sk-ant-oat01-…", "ya29.…", JWTs' dots); not "/",
# so that paths in a failing tool's stack trace stay readable.
_RUN = re.compile(rf"[A-Za-z0-9_\-.~+=]{{{TOKEN_CHARS},}}")
_WORD = re.compile(r"[^\s\"',:;{}\[\]()<>]+")


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def captured_secrets(files: dict[str, bytes]) -> list[str]:
    """The pieces of captured credential files a tool might print: a JSON file's string values
    (keys and numbers are not secrets), any other file's words; each of at least SHARED characters."""
    pieces: list[str] = []
    for data in files.values():
        text = data.decode(errors="replace")
        try:
            pieces += [word for value in _strings(json.loads(text)) for word in value.split()]
        except ValueError:
            pieces += _WORD.findall(text)
    return [piece for piece in pieces if len(piece) >= SHARED]


def _token_shaped(run: str) -> bool:
    return any(c.isdigit() for c in run) and any(c.isalpha() for c in run)


class Redactor:
    """Redacts lines against the secrets it was given (module docstring)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(secret for secret in secrets if len(secret) >= SHORTEST)
        self._pieces = {secret[i:i + SHARED] for secret in self.secrets if len(secret) >= SHARED
                        for i in range(len(secret) - SHARED + 1)}
        self._short = tuple(secret for secret in self.secrets if len(secret) < SHARED)  # matched whole

    def adding(self, secrets: Iterable[str]) -> Redactor:
        """A redactor of these secrets and more."""
        return Redactor((*self.secrets, *secrets))

    def line(self, line: str) -> str:
        if any(line[i:i + SHARED] in self._pieces for i in range(len(line) - SHARED + 1)) \
                or any(secret in line for secret in self._short):
            return REDACTED
        return _RUN.sub(lambda run: MASK if _token_shaped(run.group()) else run.group(), line)

    def lines(self, lines: Iterable[str]) -> list[str]:
        return [self.line(line) for line in lines]

    def text(self, text: str) -> str:
        """A multi-line text (a tool's reason), line by line."""
        return "\n".join(self.line(line) for line in text.split("\n"))
