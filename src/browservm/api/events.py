"""Per-VM events for Server-Sent Events: each hop as it passes (and the build steps or a retry it
waits through), then ready, failed, ended or destroyed.

Subscribers get a bounded queue each. One that does not read (a stalled client) loses its
oldest events, never the controller's memory; the terminal event is always delivered, and ends
the stream.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

TERMINAL = ("ready", "failed", "ended", "destroyed")
# Told with a `detail`, each as an SSE event of its own name: a step of the kernel's or image's
# build the VM waits for, and a create tried again under TCG (why).
NOTES = ("build", "retry")
_QUEUE = 64


@dataclass(frozen=True)
class VmEvent:
    vm_id: str
    event: str  # a hop name, or one of TERMINAL
    state: str
    seconds: float | None = None  # after the VM's creation, for a hop
    hop: str | None = None  # the failing hop, for "failed"
    reason: str | None = None
    detail: str | None = None  # for NOTES: the build step in words, or why the create is retried
    log: str | None = None  # for a build step: the build's log file on the controller's host

    def sse(self) -> str:
        kind = self.event if self.event in (*TERMINAL, *NOTES) else "stage"
        return f"event: {kind}\ndata: {json.dumps(asdict(self))}\n\n"


class Subscription:
    """One subscriber's queue, registered from the moment it is made: no event slips in between."""

    def __init__(self, bus: EventBus, vm_id: str) -> None:
        self._bus = bus
        self.vm_id = vm_id
        self.queue: asyncio.Queue[VmEvent | None] = asyncio.Queue(_QUEUE)

    def put(self, event: VmEvent | None) -> None:
        if self.queue.full():
            self.queue.get_nowait()  # drop the oldest: a slow reader costs itself events, not us memory
        self.queue.put_nowait(event)

    async def __aiter__(self) -> AsyncIterator[VmEvent]:
        """The events from now on, until a terminal one (included) or the bus closes."""
        while (event := await self.queue.get()) is not None:
            yield event
            if event.event in TERMINAL:
                return

    async def wake(self, timeout: float) -> bool:
        """Wait for the next event or `timeout`; False once the bus has closed (the controller stops)."""
        try:
            async with asyncio.timeout(timeout):  # not wait_for: see inotify.DirectoryWatch.changed
                return await self.queue.get() is not None
        except TimeoutError:
            return True

    def close(self) -> None:
        self._bus.unsubscribe(self)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}

    def publish(self, event: VmEvent) -> None:
        for subscription in self._subscribers.get(event.vm_id, ()):
            subscription.put(event)

    def subscribe(self, vm_id: str) -> Subscription:
        subscription = Subscription(self, vm_id)
        self._subscribers.setdefault(vm_id, set()).add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.vm_id, set())
        subscribers.discard(subscription)
        if not subscribers:
            self._subscribers.pop(subscription.vm_id, None)

    def close(self) -> None:
        """End every stream (the controller is shutting down)."""
        for subscriptions in self._subscribers.values():
            for subscription in subscriptions:
                subscription.put(None)
