"""The one thread the host network's pyroute2 work runs on, and the namespace's links it keeps.

pyroute2's synchronous API drives an asyncio loop of its own, which cannot run inside a caller's
running loop (the VM manager's); one thread of its own also keeps the netlink socket out of
concurrent use.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

from browservm.hostnet.links import Links
from browservm.hostnet.netns import NetworkNamespace

P = ParamSpec("P")
R = TypeVar("R")


class NetlinkThread:
    def __init__(self, netns: NetworkNamespace) -> None:
        self._netns = netns
        self._links: Links | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostnet")
        self._ident = self._executor.submit(threading.get_ident).result()

    def call(self, work: Callable[P, R], /, *args: P.args, **kwargs: P.kwargs) -> R:
        """`work` on this thread (at once when already on it), its result or its exception."""
        if threading.get_ident() == self._ident:
            return work(*args, **kwargs)
        return self._executor.submit(work, *args, **kwargs).result()

    @contextmanager
    def inside(self) -> Iterator[Links]:
        """The namespace entered, and its Links (made once: its socket stays in the namespace). On this
        thread only."""
        assert threading.get_ident() == self._ident, "the host network's links are used on their own thread"
        with self._netns.entered():
            if self._links is None:
                self._links = Links(netns=self._netns.name)
            yield self._links

    def close_links(self) -> None:
        """Close the namespace's links (before the namespace is deleted); they are made again when used."""
        self.call(self._close_links)

    def _close_links(self) -> None:
        if self._links is not None:
            self._links.close()
            self._links = None

    def shutdown(self) -> None:
        self.close_links()
        self._executor.shutdown()
