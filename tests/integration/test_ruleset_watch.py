"""The kernel tells the controller when another program changes its namespace's ruleset or routing rules,
and not when the controller itself adds a VM's port or another program changes a table of its own
(hostnet/watch.py), in a namespace of the test's own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from browservm.hostnet.host import FIREWALL
from browservm.hostnet.watch import RulesetWatch

from .conftest import Namespaces, run
from .test_isolation import lab

pytestmark = pytest.mark.host

QUIET_S = 1.0  # how long a watch that should stay silent is given to speak
DEADLINE_S = 30.0


def changed(watch: RulesetWatch, timeout: float) -> bool:
    return asyncio.run(watch.changed(timeout))


def test_another_programs_change_wakes_the_watch_and_our_own_ports_do_not(
        namespaces: Namespaces, tmp_path: Path) -> None:
    with lab(namespaces, tmp_path) as net:
        net.up()
        with net.network.watch() as watch:
            assert not changed(watch, QUIET_S)
            net.guest("vm-aa")  # its port's set elements, added by this process
            assert not changed(watch, QUIET_S), "the controller's own port woke its drift check"
            run("nft", "add", "table", "inet", "someone", netns=net.ctl)  # a firewall manager's own table
            run("nft", "add", "set", "inet", "someone", "banned", "{ type ipv4_addr; }", netns=net.ctl)
            run("nft", "add", "element", "inet", "someone", "banned", "{ 192.0.2.1 }", netns=net.ctl)
            assert not changed(watch, QUIET_S), "another program's own table woke the drift check"
            run("nft", "delete", "element", "bridge", "browservm", "vm_mac",
                f'{{ "{net.guests[0].lease.tap}" . {net.guests[0].lease.mac} }}', netns=net.ctl)
            assert changed(watch, DEADLINE_S), "a VM's element removed by another program went unnoticed"
            assert [c.piece for c in net.network.check_and_restore()] == [FIREWALL]
            changed(watch, QUIET_S)  # the restore is an `nft` process: it may wake the watch once, harmlessly

            run("nft", "flush", "ruleset", netns=net.ctl)  # as Debian's nftables.service does on reload
            run("nft", "flush", "ruleset", netns=net.ctl)
            assert changed(watch, DEADLINE_S)
            assert not changed(watch, QUIET_S), "two flushes waiting woke the watch twice"
            assert [c.piece for c in net.network.check_and_restore()] == [FIREWALL]
            changed(watch, QUIET_S)  # the restore is an `nft` process: it may wake the watch once, harmlessly
            assert net.network.check_and_restore() == []

            run("ip", "rule", "del", "pref", "100", netns=net.ctl)
            assert changed(watch, DEADLINE_S)

            elsewhere = namespaces.create("other")
            run("nft", "add", "table", "inet", "someone", netns=elsewhere)
            assert not changed(watch, QUIET_S), "a change in another namespace woke the watch"
