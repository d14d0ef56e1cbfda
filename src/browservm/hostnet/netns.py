"""Named network namespaces, as `ip netns` makes them (a bind mount under /run/netns).

`entered()` moves only the calling thread into the namespace and back. Netlink
sockets keep the namespace they were opened in, and child processes and
/proc/sys/net files take the namespace of the thread that creates or opens
them, so everything done inside `entered()` happens in the namespace.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pyroute2 import netns as pyroute2_netns  # type: ignore[import-untyped]

from browservm.errors import HostNetworkError

NETNS_DIR = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int, name: str) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise HostNetworkError("enter namespace", os.strerror(code), netns=name)


class NetworkNamespace:
    """A named network namespace; `NetworkNamespace(None)` is the caller's own and is never changed."""

    def __init__(self, name: str | None) -> None:
        self.name = name

    @property
    def path(self) -> Path | None:
        return None if self.name is None else NETNS_DIR / self.name

    def exists(self) -> bool:
        return self.path is None or self.path.exists()

    def create(self) -> bool:
        """Create the namespace; True if this call created it, False if it was there."""
        if self.name is None or self.exists():
            return False
        try:
            pyroute2_netns.create(self.name)
        except OSError as exc:
            if exc.errno == errno.EEXIST:
                return False
            raise HostNetworkError("create namespace", str(exc), netns=self.name) from exc
        return True

    def delete(self) -> None:
        if self.name is None:
            raise HostNetworkError("delete namespace", "refusing to delete the caller's own namespace")
        if not self.exists():
            return
        try:
            pyroute2_netns.remove(self.name)
        except OSError as exc:
            raise HostNetworkError("delete namespace", str(exc), netns=self.name) from exc

    @contextmanager
    def entered(self) -> Iterator[None]:
        if self.path is None:
            yield
            return
        try:
            target = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise HostNetworkError("enter namespace", "does not exist (run `browservm host up`)",
                                   netns=self.name) from None
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target, str(self.name))
            try:
                yield
            finally:
                _setns(saved, "the caller's own")
        finally:
            os.close(target)
            os.close(saved)

    def __repr__(self) -> str:
        return f"NetworkNamespace({self.name!r})"
