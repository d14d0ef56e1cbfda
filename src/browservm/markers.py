"""The one-line markers a guest prints on its serial console, and their parser.

    browservm-net: status=ok device=eth0 address=192.168.100.3/24 gateway=192.168.100.1 by=configurator
    browservm-ready: service=websockify port=6080

A marker is a topic and `key=value` fields, quoted like a shell word when a
value has spaces. The host finds them anywhere in a console line (after a
kernel timestamp or a systemd prefix). Stdlib-only: the guest carries it.
"""

from __future__ import annotations

import re
import shlex

PREFIX = "browservm-"
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
