"""Waiting without blocking the event loop: for a process to exit, for blocking work in a thread,
for a probe raced against a VMM's exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from browservm.vmm import process
from browservm.vmm.process import VmmProcess

T = TypeVar("T")


class ExitWatch:
    """A future that completes when a process exits (its pidfd becomes readable).

    Works for processes that are not our children. Bound to the event loop that made it;
    `close` is safe after that loop has ended.
    """

    def __init__(self, watched: VmmProcess) -> None:
        self._loop = asyncio.get_running_loop()
        self.future: asyncio.Future[None] = self._loop.create_future()
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(watched.pid)
        except ProcessLookupError:
            self.future.set_result(None)
            return
        if not process.alive(watched):  # exited, or the PID reused, before the pidfd was opened
            self.future.set_result(None)
            os.close(self._pidfd)
            self._pidfd = None
            return
        self._loop.add_reader(self._pidfd, self._exited)

    def _exited(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        self.close()

    def close(self) -> None:
        if self._pidfd is None:
            return
        if not self._loop.is_closed():
            self._loop.remove_reader(self._pidfd)
            if not self.future.done():
                self.future.cancel()
        os.close(self._pidfd)
        self._pidfd = None


async def uninterrupted(work: Callable[[], T]) -> T:
    """Run blocking `work` in a thread, to its end even if the caller is cancelled meanwhile.

    A TAP half-made by a thread nobody waits for is a TAP nobody undoes: so a cancellation
    waits for the work to finish (its effects are then known and can be undone) and is
    delivered afterwards.
    """
    return await to_the_end(asyncio.to_thread(work))


async def to_the_end(work: Awaitable[T]) -> T:
    """Await `work` to its end even if the caller is cancelled meanwhile; the cancellation is delivered
    afterwards. For steps that must not stop half-way (a VM marked destroying and not released)."""
    future = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await wait_out(future)
        raise


async def wait_out(future: asyncio.Future[T]) -> None:
    """Wait until `future` is done, whatever happens to the waiter meanwhile; never raises its error."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # retrieved: the caller reports it its own way
    if cancelled:
        raise asyncio.CancelledError


class VmmExited(Exception):
    """The VMM ended while a hop was being waited for."""

    def __init__(self, hop: str) -> None:
        super().__init__(f"the VMM exited while waiting for {hop}")
        self.hop = hop


async def race(hop: str, work: Awaitable[T], timeout: float, exited: asyncio.Future[None],
               trouble: asyncio.Future[Any] | None = None) -> T:
    """`work` within `timeout` unless the VMM exits first (VmmExited) or `trouble` ends first (its
    error: the guest stopped, vm/stall.py); TimeoutError at the deadline.

    The work is cancelled, and waited for, however this ends: no probe outlives its hop. `trouble`
    is left running: it watches the whole readiness, not one hop.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    try:
        waiting: set[asyncio.Future[object]] = {task, exited}  # type: ignore[arg-type]
        if trouble is not None:
            waiting.add(trouble)
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        if exited in done:
            raise VmmExited(hop)
        if trouble is not None and trouble in done:
            trouble.result()
            raise AssertionError(f"the guest watch ended without a finding during {hop}")
        raise TimeoutError(f"not done within {timeout:g} s")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait_out(task)
