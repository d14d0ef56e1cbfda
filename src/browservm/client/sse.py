"""Server-Sent Events (text/event-stream) as the controller sends them: `event:` and `data:` fields,
dispatched at each blank line, the data JSON. One parser, fed line by line, for the sync and the async client.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator

from browservm.client.models import Event


class EventParser:
    """Fed one line at a time (without its line ending); gives an Event when a blank line ends one."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> Event | None:
        if not line:
            event, data = self._event, self._data
            self._event, self._data = "message", []
            return Event(event, json.loads("\n".join(data))) if data else None
        if line.startswith(":"):
            return None  # a comment, as keep-alives are
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def server_sent_events(lines: Iterable[str]) -> Iterator[Event]:
    parser = EventParser()
    for line in lines:
        if (event := parser.feed(line)) is not None:
            yield event
