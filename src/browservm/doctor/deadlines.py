"""How long each of the doctor's steps may take, and how a blocking step is held to it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from browservm.errors import BrowserVMError

T = TypeVar("T")


@dataclass(frozen=True)
class Deadlines:
    """Seconds each step may take. Passing steps take milliseconds and the walk stops at the first
    failure, so one VM's run stays far below the sum (the worst case is about 4.5 s)."""

    host: float = 1.5  # the namespace snapshot and `host status`, side by side
    vmm: float = 0.5
    console: float = 0.5
    images: float = 1.0  # kernel inspect + debugfs, only to explain a guest.network failure
    arp: float = 1.0
    tcp: float = 1.0
    websocket: float = 1.0
    rfb: float = 1.0
    version: float = 1.0  # `qemu --version` and the like, in the host run


class DoctorTimeout(BrowserVMError):
    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(f"{what} did not finish within {seconds:g} s")


async def bounded(work: Callable[[], T], timeout: float, what: str) -> T:
    """Run blocking `work` in a daemon thread of its own; DoctorTimeout at the deadline.

    Not asyncio.to_thread: the default executor's threads are joined at exit, so one hung call would
    keep a finished CLI run alive; a daemon thread that outlives its deadline is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            loop.call_soon_threadsafe(settle, None, exc)
            return
        loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=f"doctor {what}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError:
        raise DoctorTimeout(what, timeout) from None
