"""The one-line markers a guest prints on its serial console, and their parser.

    browservm-net: status=ok device=eth0 address=192.168.100.3/24 gateway=192.168.100.1 by=configurator
    browservm-ready: service=websockify state=ready port=6080

A marker is a topic and `key=value` fields, quoted like a shell word when a
value has spaces. The host finds them anywhere in a console line (after a
kernel timestamp or a systemd prefix). The desktop supervisor's `ready` markers
are read by readiness and by the doctor alike, through `parse_ready`.
Stdlib-only: the guest carries it.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

PREFIX = "browservm-"
WHOLE_DESKTOP = "desktop"  # the service of the supervisor's marker for the whole desktop
_MARKER = re.compile(r"browservm-([a-z]+): (.*)$")


def format_marker(topic: str, **fields: object) -> str:
    words = [f"{key}={shlex.quote(str(value))}" for key, value in fields.items() if value is not None]
    return f"{PREFIX}{topic}: " + " ".join(words)


def parse_marker(line: str) -> tuple[str, dict[str, str]] | None:
    """(topic, fields) of the marker in `line`, or None when it holds none."""
    match = _MARKER.search(line.rstrip("\r\n"))
    if match is None:
        return None
    try:
        words = shlex.split(match.group(2))
    except ValueError:
        return None  # a line cut in the middle of a quoted value
    fields = dict(word.partition("=")[::2] for word in words if "=" in word)
    return match.group(1), fields


@dataclass(frozen=True)
class ReadyMarker:
    """The desktop supervisor's `browservm-ready` line: one part's state, or the whole desktop's
    (service=desktop, with the parts it started)."""

    service: str
    state: str  # ready, failed or exited
    services: tuple[str, ...]  # on the whole desktop's marker: the parts it started
    reason: str
    code: str
    line: str

    @property
    def stopped(self) -> bool:
        return self.state in ("failed", "exited")

    def says_ready(self, service: str) -> bool:
        return self.service == service and self.state == "ready"

    @property
    def why(self) -> str:
        """What a part that stopped gave as its reason, or its exit code."""
        return self.reason or f"code {self.code or '?'}"


def parse_ready(line: str) -> ReadyMarker | None:
    """The `browservm-ready` marker in `line`, or None when it holds none."""
    marker = parse_marker(line)
    if marker is None or marker[0] != "ready":
        return None
    fields = marker[1]
    return ReadyMarker(fields.get("service", ""), fields.get("state", ""),
                       tuple(filter(None, fields.get("services", "").split(","))), fields.get("reason", ""),
                       fields.get("code", ""), line)
