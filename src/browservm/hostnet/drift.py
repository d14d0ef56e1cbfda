"""Drift: someone else changed or removed browservm's tables or routing rules, and they are put back.

The service calls `check_and_restore` when the kernel tells of a change (watch.py), and every
half minute regardless; what it restores is logged and
kept in the store, the latest _DRIFT_KEPT of them, for `host status` to report.
"""

from __future__ import annotations

import logging
import time

from browservm.hostnet.expected import FIREWALL
from browservm.hostnet.installed import InstalledFirewall
from browservm.hostnet.lifecycle import HostLifecycle
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.pieces import Change
from browservm.hostnet.portlock import PortLock
from browservm.hostnet.recorded import HostRecords
from browservm.hostnet.rules import rule_pref
from browservm.hostnet.worker import NetlinkThread
from browservm.netplan import NetworkPlan

_DRIFT_KEPT = 20  # drift events kept in the store
_log = logging.getLogger("browservm.hostnet")


class Drift:
    def __init__(self, plan: NetworkPlan, netns: NetworkNamespace, thread: NetlinkThread, *, records: HostRecords,
                 lifecycle: HostLifecycle, firewall: InstalledFirewall, port_lock: PortLock) -> None:
        self._plan = plan
        self._netns = netns
        self._thread = thread
        self._records = records
        self._lifecycle = lifecycle
        self._firewall = firewall
        self._port_lock = port_lock

    def check_and_restore(self) -> list[Change]:
        """Put back our tables and routing rules if anything removed or changed them; what it restored.

        Blocking, for a background task: when nothing drifted
        it costs one `nft list ruleset` and one `ip rule show` (a few ms). Each
        restoration is logged and recorded in the store (`events`), and
        `status()` reports drift until it is repaired. Does nothing before `host up`.
        On the netlink thread.
        """
        if not self._firewall.installed() or not self._netns.exists():
            return []
        changes = []
        with self._thread.inside() as links:
            for segment in self._plan.segments:
                if self._records.get("rule", f"{segment.bridge} {rule_pref(segment.index)}") is not None:
                    change = self._lifecycle.rule(segment)
                    if change.action != "unchanged":
                        changes.append(Change(change.piece, "restored", "it was removed"))
            with self._port_lock:
                check = self._firewall.check(links)
                if not check.ok:
                    change = self._firewall.install(links)
                    if change.action != "unchanged":
                        changes.append(Change(FIREWALL, "restored", check.detail))
        for change in changes:
            _log.warning("host network drift: %s %s (%s)", change.action, change.piece, change.detail)
            self._record(change)
        return changes

    def _record(self, change: Change) -> None:
        now = time.time()
        self._records.add("drift", f"{now:.6f}", f"{change.piece}: {change.detail}")
        for stale in self._records.names("drift")[:-_DRIFT_KEPT]:
            self._records.remove("drift", stale)

    def events(self) -> list[tuple[float, str]]:
        """(time, what was restored) for the latest restorations, oldest first."""
        return [(float(name), self._records.get("drift", name) or "") for name in self._records.names("drift")]
