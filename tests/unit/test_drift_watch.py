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
from browservm.hostnet.watch import Transactions

from .fakes import FakeRulesetWatch
from .test_api import Served, ServedNetwork, until

OURS = (("inet", "browservm"), ("bridge", "browservm"))
INET, BRIDGE = 1, 7
NFT = 10 << 8  # NFNL_SUBSYS_NFTABLES
NEWSETELEM, DELTABLE, NEWGEN = NFT | 12, NFT | 2, NFT | 15


def message(kind: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, 0, 0, 0) + payload + b"\0" * (-len(payload) % 4)


def attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def touching(kind: int, family: int, table: str) -> bytes:
    """An nftables object's notification: its family in nfgenmsg, its table's name as attribute 1."""
    return message(kind, bytes([family, 0, 0, 0]) + attribute(1, table.encode() + b"\0"))


def newgen(pid: int | None) -> bytes:
    """NFT_MSG_NEWGEN, which ends every nftables transaction: its generation and the committing thread."""
    attributes = attribute(1, struct.pack(">I", 7))
    if pid is not None:
        attributes += attribute(2, struct.pack(">I", pid))
    return message(NEWGEN, b"\0\0\0\0" + attributes + attribute(3, b"nft\0"))


OTHER_PROCESS = 1  # PID 1's thread is never one of ours
DELRULE = message(33, b"\x02" + b"\0" * 11)


def transaction(*messages: bytes) -> bool:
    """Whether the notifications, one datagram each as the kernel sends them, wake the check."""
    transactions = Transactions(OURS)
    return any([transactions.feed(datagram) for datagram in messages])


def test_another_programs_change_to_our_tables_wakes_the_check() -> None:
    assert transaction(touching(DELTABLE, INET, "browservm"), touching(DELTABLE, BRIDGE, "browservm"),
                       newgen(OTHER_PROCESS))
    assert transaction(touching(NEWSETELEM, BRIDGE, "browservm"), newgen(OTHER_PROCESS))


def test_our_own_threads_change_and_other_programs_tables_wake_nothing() -> None:
    assert not transaction(touching(NEWSETELEM, BRIDGE, "browservm"), newgen(threading.get_native_id()))
    assert not transaction(touching(NEWSETELEM, INET, "f2b-table"), newgen(OTHER_PROCESS))
    assert not transaction(touching(NEWSETELEM, INET, "browservm-other"), newgen(OTHER_PROCESS))
    assert not transaction(touching(NEWSETELEM, 2, "browservm"), newgen(OTHER_PROCESS))  # family ip: not ours


def test_each_transaction_is_judged_on_its_own() -> None:
    transactions = Transactions(OURS)
    assert not transactions.feed(touching(NEWSETELEM, BRIDGE, "browservm"))  # not committed yet
    assert not transactions.feed(newgen(threading.get_native_id()))
    assert not transactions.feed(touching(NEWSETELEM, INET, "f2b-table") + newgen(OTHER_PROCESS))
    assert transactions.feed(touching(DELTABLE, INET, "browservm") + newgen(OTHER_PROCESS))


def test_what_cannot_be_attributed_is_looked_at() -> None:
    assert transaction(touching(DELTABLE, INET, "browservm"), newgen(None))  # a kernel that names no thread
    assert transaction((touching(NEWSETELEM, BRIDGE, "browservm") + newgen(OTHER_PROCESS))[:-6])  # cut short
    assert transaction(DELRULE)  # routing rules: anyone's change is looked at


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

