"""Following a VM's boot or a login across subscriptions to its event stream, without I/O.

Both streams replay what already passed to a new subscriber, and both may go quiet for long (a hop's
own deadline, a person signing in). The client subscribes and hands each event to a watch; when the
stream ends or stays quiet, the watch is given the record (fetched by the client) and says whether
the thing followed is settled, the client subscribing again while it is not. The sync and the async
client drive the same watches (client.py, aio.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Generic, TypeVar

from browservm.client.errors import LoginFailed, StreamEnded, VmFailed
from browservm.client.models import VM_NOTES, VM_TERMINAL, Event, Login, Vm

R = TypeVar("R")

OnStage = Callable[[str, float], None]
OnNote = Callable[[str, str], None]
OnChange = Callable[[Login], None]


class Deadline:
    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self._end = None if timeout is None else time.monotonic() + timeout

    def passed(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end

    def quiet(self, events_quiet: float) -> float:
        """How long a subscription may stay quiet: the client's quiet time, or what is left of the deadline."""
        if self._end is None:
            return events_quiet
        return max(0.01, min(events_quiet, self._end - time.monotonic()))


class Watch(Generic[R]):
    what = ""

    def __init__(self, ident: str) -> None:
        self.id = ident
        self.state = "unknown"

    def event(self, event: Event) -> bool:
        """Take one event; True once the stream has told the end (the client stops reading it)."""
        raise NotImplementedError

    def known(self) -> R | None:
        """The end, when the stream told it whole (no record to fetch)."""
        return None

    def settle(self, record: R | None, quiet: bool, base_url: str) -> R | None:
        """The record once settled, or None to subscribe again. `record` is None when it is gone (404)."""
        raise NotImplementedError

    def result(self, record: R) -> R:
        """The settled record when it is what was waited for; else the failure, raised."""
        raise NotImplementedError


class VmWatch(Watch[Vm]):
    """A booting VM: each stage once as it passes (`on_stage(hop, seconds)`), each build step or retry it
    waits through (`on_note(kind, detail)`, kind `build`, `retry`, `log` (where a build writes) or
    `still` (the step under way, after a quiet stretch)); its record once ready, else VmFailed."""

    what = "VM"

    def __init__(self, vm_id: str, on_stage: OnStage | None = None, on_note: OnNote | None = None) -> None:
        super().__init__(vm_id)
        self._on_stage = on_stage or (lambda hop, seconds: None)
        self._on_note = on_note or (lambda kind, detail: None)
        self._stages: set[str] = set()
        self._notes: set[tuple[str, object]] = set()
        self._destroyed = False

    def event(self, event: Event) -> bool:
        kind, data = event
        if kind == "stage" and data.get("event") not in self._stages:  # a new subscription repeats them
            self._stages.add(str(data["event"]))
            self._on_stage(str(data["event"]), float(data.get("seconds") or 0.0))
        elif kind in VM_NOTES and (kind, data.get("detail")) not in self._notes:
            self._notes.add((kind, data.get("detail")))
            self._on_note(kind, str(data.get("detail") or ""))
            if data.get("log") and ("log", data["log"]) not in self._notes:  # once per build: where it writes
                self._notes.add(("log", data["log"]))
                self._on_note("log", str(data["log"]))
        elif kind == "destroyed":
            self._destroyed = True
        if isinstance(data.get("state"), str):
            self.state = data["state"]
        return kind in VM_TERMINAL

    def settle(self, record: Vm | None, quiet: bool, base_url: str) -> Vm | None:
        if self._destroyed or record is None:
            raise VmFailed(self.id, "destroyed", None, "it was deleted while it was being created")
        self.state = record.state
        if record.settled:
            return record
        if quiet:
            if record.building:  # a step as long as a kernel's compile: say it goes on
                self._on_note("still", record.building)
            return None  # still booting: subscribe again (the stages it already passed are skipped above)
        # No terminal event: the controller ends every stream when it stops; the VM boots on.
        raise StreamEnded(base_url, "VM", self.id, record.state)

    def result(self, record: Vm) -> Vm:
        if record.state == "ready":
            return record
        if record.failure is not None:
            raise VmFailed(self.id, record.state, record.failure.hop, record.failure.reason, record)
        raise VmFailed(self.id, record.state, None, record.ended_reason, record)


class LoginWatch(Watch[Login]):
    """A login: `on_change(login)` at each new state; the login once captured, else LoginFailed."""

    what = "login"

    def __init__(self, login_id: str, on_change: OnChange | None = None) -> None:
        super().__init__(login_id)
        self._on_change = on_change or (lambda login: None)
        self._final: Login | None = None

    def _seen(self, login: Login) -> None:
        if login.state != self.state:
            self.state = login.state
            self._on_change(login)

    def event(self, event: Event) -> bool:
        login = Login.model_validate(event.data)
        self._seen(login)
        if login.final:
            self._final = login
        return self._final is not None

    def known(self) -> Login | None:
        return self._final

    def settle(self, record: Login | None, quiet: bool, base_url: str) -> Login | None:
        if record is None:
            raise StreamEnded(base_url, "login", self.id, "gone")
        if not record.final:
            return None  # the person takes their time, or the stream was cut: subscribe again
        self._seen(record)
        return record

    def result(self, record: Login) -> Login:
        if record.state == "captured":
            return record
        raise LoginFailed(record)
