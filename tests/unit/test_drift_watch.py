"""The controller puts its host network back when the kernel says another program changed it: the
service's loop over the watch (fakes), and what counts as another program's change (hand-made
notifications). The real kernel's notifications: tests/integration/test_ruleset_watch.py."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable

import httpx
import pytest

from browservm.errors import HostNetworkError
from browservm.hostnet.watch import foreign_changes

from .test_api import FakeRulesetWatch, Served, ServedNetwork, until


def message(kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload + b"\0" * (-len(payload) % 4)


def newgen(pid: int | None) -> bytes:
    """NFT_MSG_NEWGEN, which ends every nftables transaction: its generation and the committing thread."""
    attributes = struct.pack("=HH", 8, 1) + struct.pack(">I", 7)
    if pid is not None:
        attributes += struct.pack("=HH", 8, 2) + struct.pack(">I", pid)
    attributes += struct.pack("=HH", 8, 3) + b"nft\0"
    return message((10 << 8) | 15, b"\0\0\0\0" + attributes)


NEWSETELEM = message((10 << 8) | 12, b"\x02\0\0\0")
DELRULE = message(33, b"\x02" + b"\0" * 11)


def test_a_transaction_committed_by_one_of_our_threads_is_ours() -> None:
    assert foreign_changes(NEWSETELEM + newgen(threading.get_native_id())) is False


def test_a_transaction_another_process_committed_is_foreign() -> None:
    assert foreign_changes(NEWSETELEM + newgen(1)) is True  # PID 1's thread is never ours


def test_what_cannot_be_attributed_is_looked_at() -> None:
    assert foreign_changes(newgen(None)) is True  # a kernel that names no thread
    assert foreign_changes((NEWSETELEM + newgen(threading.get_native_id()))[:-6]) is True  # cut short
    assert foreign_changes(DELRULE) is True  # routing rules: anyone's change is looked at


def test_notifications_without_a_commit_are_not_a_change_yet() -> None:
    assert foreign_changes(NEWSETELEM) is False  # its NEWGEN follows, and is judged


def test_the_service_checks_once_subscribed_and_again_at_each_change(serve: Callable[..., Served]) -> None:
    served = serve()
    network = served.parts.network
    assert isinstance(network, ServedNetwork)

    async def scenario(client: httpx.AsyncClient) -> FakeRulesetWatch:
        await served.service.start()
        await until(lambda: network.drift_checks == 1, "the first check, once subscribed")
        [watch] = network.watches
        watch.notify()
        await until(lambda: network.drift_checks == 2, "a check after the kernel's notification")
        return watch

    watch = served.run(scenario)
    assert watch.closed


def test_a_watch_that_cannot_be_had_is_logged_and_the_check_still_runs(
        serve: Callable[..., Served], caplog: pytest.LogCaptureFixture) -> None:
    class Unwatchable(ServedNetwork):
        def watch(self) -> FakeRulesetWatch:
            raise HostNetworkError("subscribe to nftables and routing-rule notifications", "Operation not permitted",
                                   netns="vms")

    network = Unwatchable()
    served = serve(network)

    async def scenario(client: httpx.AsyncClient) -> None:
        await served.service.start()
        await until(lambda: network.drift_checks == 1, "the check without a watch")

    with caplog.at_level(logging.WARNING, logger="browservm.service"):
        served.run(scenario)
    assert ("host network drift watch: host network, subscribe to nftables and routing-rule notifications in "
            "netns vms: Operation not permitted") in caplog.messages

