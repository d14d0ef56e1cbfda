"""Reading a controller's event streams: Server-Sent Events, and following one across subscriptions.

`vm create --url` follows a booting VM (GET /v1/vms/{id}/events), `login` a login (GET
/v1/logins/{id}/events). Both streams replay what already passed to a new subscriber, and both may
go quiet for long (a hop's own deadline, a person signing in): the follower subscribes, hands each
event on, and when the stream ends or stays quiet asks the caller whether the thing followed is
settled, subscribing again while it is not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from contextlib import closing
from typing import Any, TypeVar

T = TypeVar("T")
Event = tuple[str, dict[str, Any]]


class Quiet(Exception):
    """No byte on an event stream for as long as the client waits (ControllerClient.events_quiet)."""


def server_sent_events(lines: Iterator[str]) -> Iterator[Event]:
    """Parse text/event-stream: `event:` and `data:` fields, dispatched at each blank line."""
    event = "message"
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue  # a comment, as keep-alives are
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def follow(subscribe: Callable[[], Generator[Event, None, None]], on_event: Callable[[str, dict[str, Any]], bool],
           settle: Callable[[bool], T | None]) -> T:
    """Subscribe and hand each event to `on_event` until it says the stream told what it will (True), the
    stream ends, or it goes quiet (Quiet); then `settle(quiet)` gives the result, or None to subscribe again.

    `on_event` sees a new subscription's replay of what passed: it skips what it has seen.
    """
    while True:
        quiet = False
        try:
            # closing(): leaving the loop early closes the stream at once, not when it is collected
            with closing(subscribe()) as stream:
                for kind, data in stream:
                    if on_event(kind, data):
                        break
        except Quiet:
            quiet = True
        result = settle(quiet)
        if result is not None:
            return result
