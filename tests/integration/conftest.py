"""Fixtures for tests against real kernel objects, each inside namespaces it creates.

Every namespace a test makes is deleted afterwards, even when the test fails,
and the host's own namespace is compared before and after each test: links,
addresses, routes, nftables ruleset and forwarding must be exactly as they were.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from browservm.hostnet.netns import NetworkNamespace

_counter = itertools.count()


def run(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check, timeout=60)


def _host_snapshot() -> dict[str, object]:
    def ip_json(*args: str) -> object:
        data = json.loads(run("ip", "-j", *args).stdout or "[]")
        for entry in data:
            for volatile in ("stats64", "operstate", "linkmode", "addr_info_cache"):
                entry.pop(volatile, None)
        return data
    return {
        "links": ip_json("link", "show"),
        "addresses": ip_json("addr", "show"),
        "routes": ip_json("route", "show", "table", "all"),
        "nft": run("nft", "list", "ruleset").stdout,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


@pytest.fixture(autouse=True)
def host_namespace_untouched() -> Iterator[None]:
    before = _host_snapshot()
    yield
    assert _host_snapshot() == before, "the test changed the host's own network namespace"


class Namespaces:
    """Hands out fresh namespace names and deletes every one of them at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def name(self, role: str = "ctl") -> str:
        name = f"bvt-{os.getpid()}-{next(_counter)}-{role}"
        self.names.append(name)
        return name

    def create(self, role: str = "ctl") -> str:
        name = self.name(role)
        run("ip", "netns", "add", name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            NetworkNamespace(name).delete()


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()
        leftovers = [n for n in spaces.names if NetworkNamespace(n).exists()]
        assert not leftovers, f"namespaces left behind: {leftovers}"
