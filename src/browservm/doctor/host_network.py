"""The VM network's pieces on the host, judged from one read of them:

    host.netns host.bridge host.forwarding host.firewall host.uplink

Every property `host up` set is compared with what is there, from the host network's own description
(doctor/props.py, hostnet/expected.py); a changed one is named with the expected and the found value.
What `host status` finds wrong that no piece covers is named too, never lost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from browservm.doctor.deadlines import Deadlines, DoctorTimeout, bounded
from browservm.doctor.hostview import HostView, foreign_drop_policies, foreign_drops, read_host_view
from browservm.doctor.props import firewall_properties, host_properties
from browservm.doctor.report import (
    HOST_BRIDGE,
    HOST_FIREWALL,
    HOST_FORWARDING,
    HOST_NETNS,
    HOST_UPLINK,
    SKIPPED,
    Finding,
    HopResult,
)
from browservm.doctor.sources import Sources
from browservm.errors import BrowserVMError
from browservm.hostnet.expected import Expectation, plan_expectation
from browservm.hostnet.firewall import TABLES
from browservm.hostnet.pieces import Check
from browservm.vm.desktop_path import PATHS

T = TypeVar("T")


@dataclass(frozen=True)
class HostState:
    """The VM network as one read found it."""

    view: HostView | None  # the namespace's snapshot; None when it took over its deadline
    checks: list[Check]  # `host status`
    error: str | None  # why `host status`, or what `host up` set, could not be read
    expectation: Expectation  # what `host up` set (or, failing that, what the plan alone says)
    seconds: float  # how long the read took


class NetworkPieces:
    def __init__(self, sources: Sources, deadlines: Deadlines) -> None:
        self._s = sources
        self._d = deadlines

    async def read(self) -> HostState:
        """The namespace snapshot, `host status` and what was set, side by side."""
        started = time.monotonic()

        async def view() -> HostView | None:
            try:
                return await bounded(lambda: read_host_view(self._s.netns), self._d.host, "reading the namespace")
            except DoctorTimeout:
                return None

        no_checks: list[Check] = []
        fallback = plan_expectation(self._s.plan, self._s.netns.name)
        snapshot, (checks, error), (expectation, expected_error) = await asyncio.gather(
            view(), _evidence(self._s.status, no_checks, self._d.host, "host status"),
            _evidence(self._s.expected, fallback, self._d.host, "what `host up` set"))
        return HostState(snapshot, checks, error or expected_error, expectation, time.monotonic() - started)

    def judge(self, state: HostState, *, for_vm: bool) -> list[HopResult]:
        """The host network's pieces, judged from one snapshot: each carries the snapshot's time."""
        view, checks, expectation = state.view, state.checks, state.expectation
        netns = HopResult(HOST_NETNS, seconds=state.seconds)
        pieces = [netns] + [HopResult(name, seconds=state.seconds)
                            for name in (HOST_BRIDGE, HOST_FORWARDING, HOST_FIREWALL, HOST_UPLINK)]
        if view is None:
            netns.found(Finding("probe.error", f"reading the VM network's namespace took over {self._d.host:g} s"))
            for piece in pieces[1:]:
                piece.status = SKIPPED
            return pieces
        name = self._s.netns.name
        netns.checked.append(f"namespace {name} exists" if name else "the VM network is in this host's own namespace")
        if not view.netns_exists:
            netns.found(Finding("netns.missing", f"the namespace {name} does not exist: nothing of the VM network "
                                                 "is there", [f"/run/netns/{name} is missing"]))
            for piece in pieces[1:]:
                piece.status = SKIPPED
            return pieces
        for error in view.errors:
            netns.found(Finding("probe.error", "part of the namespace could not be read", [error], fatal=False))
        if self._s.status is None:
            netns.found(Finding("state.missing", "this state directory has no database: `host up` never ran with it",
                                fatal=False))
        elif state.error is not None:
            netns.found(Finding("probe.error", "`host status` could not run", [state.error], fatal=False))
        bridge, _, firewall, uplink = pieces[1:]
        # Every property `host up` set, from the host network's own description (doctor/props.py).
        host_properties(expectation, view, {piece.hop: piece for piece in pieces})
        self._bridges(view, bridge)
        self._firewall(view, checks, expectation, firewall, for_vm)
        self._uplink(view, uplink)
        self._other_checks(checks, bridge, firewall, for_vm)
        return pieces

    def _bridges(self, view: HostView, result: HopResult) -> None:
        """No other link in the VM subnet (what the bridges themselves carry is in host_properties)."""
        plan = self._s.plan
        ours = set(plan.bridges)
        result.checked.append(f"no other link carries an address in {plan.subnet}")
        for other in view.links.values():
            if other.name in ours:
                continue
            for address in view.addresses.get(other.index, []):
                if address.network.overlaps(plan.subnet):
                    result.found(Finding("bridge.address_elsewhere",
                                         f"{other.name} carries {address}, inside the VM subnet {plan.subnet}",
                                         [f"{other.name}: {address}"]))

    def _firewall(self, view: HostView, checks: list[Check], expectation: Expectation, result: HopResult,
                  for_vm: bool) -> None:
        plan = self._s.plan
        if view.ruleset is None:
            result.found(Finding("probe.error", "the nftables ruleset could not be listed", fatal=False))
            return
        present = view.our_tables()
        missing = [f"{family} {table}" for family, table in TABLES if (family, table) not in present]
        result.checked.append(f"browservm's tables present: {', '.join(f'{f} {t}' for f, t in TABLES)}")
        if missing:
            result.found(Finding("nft.table_missing", f"browservm's nftables table {', '.join(missing)} is missing",
                                 [f"nft list ruleset has no table {name}" for name in missing]))
        named = not missing and firewall_properties(expectation, view, result)
        for check in checks:
            # What the named differences do not cover: another configuration, an interrupted install.
            if check.piece.startswith("nftables") and not check.ok and not missing and not named:
                result.found(Finding("nft.table_changed", "browservm's nftables tables are not as `host up` "
                                     f"wrote them: {check.detail}", [f"{check.piece}: {check.detail}"]))
        result.checked.append("equal to what `host up` would write" if checks else
                              "equal to what `host up` would write: not checked (no state directory)")
        # A rule that drops the subnet or a bridge matches for every port: listed once.
        drops = list(dict.fromkeys(drop for path in PATHS.values()
                                   for drop in foreign_drops(view.ruleset, plan.subnet, plan.bridges, path.port)))
        ports = ", ".join(f":{path.port}" for path in PATHS.values())
        result.checked.append(f"no rule outside browservm's tables drops {ports}, {plan.subnet} or "
                              f"{', '.join(plan.bridges)}")
        if drops:
            evidence = list(drops)
            if view.sysctls.get("net.bridge.bridge-nf-call-iptables") == "1":
                evidence.append("net.bridge.bridge-nf-call-iptables = 1: bridged traffic passes these hooks too")
            # For a VM the probes show whether the rule bites (net.tcp then names it); the host alone can't tell.
            result.found(Finding("firewall.foreign_drop", f"{len(drops)} rule(s) outside browservm's tables drop "
                                                          "VM traffic", evidence, fatal=not for_vm))
        policies = foreign_drop_policies(view.ruleset)
        if policies:
            result.found(Finding("firewall.foreign_policy", "a base chain outside browservm's tables drops by "
                                                            "policy", policies, fatal=False))

    def _uplink(self, view: HostView, result: HopResult) -> None:
        uplink = self._s.plan.uplink
        if uplink is None:
            result.checked.append("no --uplink configured: VMs reach only the host")
            return
        link = view.links.get(uplink)
        result.checked.append(f"uplink {uplink} exists and is up")
        if link is None:
            result.found(Finding("uplink.missing", f"the uplink {uplink} does not exist: VM traffic has no way out",
                                 [f"no link named {uplink} in the namespace"]))
        elif not link.up:
            result.found(Finding("uplink.down", f"the uplink {uplink} is down", [f"{uplink}: no IFF_UP"]))

    def _other_checks(self, checks: list[Check], bridge: HopResult, firewall: HopResult, for_vm: bool) -> None:
        """What `host status` finds wrong that no piece above covers (its list grows): named, not lost."""
        known = ("netns", "sysctl", "bridge ", "nftables", "routing rule", "uplink")
        for check in checks:
            if check.ok or check.piece.startswith(known):
                continue
            per_vm = check.piece.startswith(("tap ", "lease "))
            if per_vm and for_vm:
                continue  # the VM's own TAP is checked at net.tcp's side; others' are not this VM's problem
            target = firewall if "nft" in check.piece or "rule" in check.piece else bridge
            target.found(Finding("host.check_failed", f"{check.piece}: {check.detail}",
                                 [f"host status: {check.piece}: {check.detail}"], fatal=False))


async def _evidence(work: Callable[[], T] | None, fallback: T, timeout: float, what: str) -> tuple[T, str | None]:
    """`work`'s answer within its deadline; or `fallback` and why not (nothing to say without `work`):
    what the doctor cannot read is evidence, not a crash."""
    if work is None:
        return fallback, None
    try:
        return await bounded(work, timeout, what), None
    except (BrowserVMError, OSError) as exc:
        return fallback, str(exc)
    except Exception as exc:  # SQLite's and netlink's own errors
        return fallback, f"{type(exc).__name__}: {exc}"
