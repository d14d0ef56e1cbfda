"""Kernel parameters under /proc/sys.

`net.*` keys belong to a network namespace: the namespace of the thread that
opens the file, so inside `NetworkNamespace.entered()` they are that
namespace's and the host's own stay untouched.
"""

from __future__ import annotations

from pathlib import Path

from browservm.errors import HostNetworkError

IP_FORWARD = "net.ipv4.ip_forward"  # the one sysctl `host up` sets


class Sysctl:
    def __init__(self, root: Path = Path("/proc/sys"), netns: str | None = None) -> None:
        self._root = root
        self._netns = netns  # for error messages only

    def _path(self, key: str) -> Path:
        return self._root / key.replace(".", "/")

    def read(self, key: str) -> str:
        try:
            return self._path(key).read_text().strip()
        except OSError as exc:
            raise HostNetworkError(f"read sysctl {key}", exc.strerror or str(exc), netns=self._netns) from exc

    def write(self, key: str, value: str) -> None:
        try:
            self._path(key).write_text(value + "\n")
        except OSError as exc:
            raise HostNetworkError(f"write sysctl {key}={value}", exc.strerror or str(exc),
                                   netns=self._netns) from exc
