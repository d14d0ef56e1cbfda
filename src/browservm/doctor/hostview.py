"""The doctor's look at the VM network's namespace: the read-only snapshot `host status` judges too
(hostnet/observed.py), and what in other programs' nftables tables would stop VM traffic.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from browservm.hostnet.firewall import TABLES
from browservm.hostnet.nftwords import describe_rule
from browservm.hostnet.observed import Neighbour, Snapshot, read_snapshot

HostView = Snapshot
read_host_view = read_snapshot
__all__ = ["HostView", "Neighbour", "describe_rule", "foreign_drop_policies", "foreign_drops", "read_host_view"]


# --- other firewalls: what in someone else's tables would stop VM traffic -----------------------

_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")


def _mentions(value: Any, port: int, subnet: IPv4Network, names: tuple[str, ...]) -> bool:
    """Whether a match's right-hand side names the desktop port, an address in the subnet, or a bridge."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value == port
    if isinstance(value, str):
        if value in names:
            return True
        try:
            return IPv4Address(value) in subnet
        except ValueError:
            return False
    if isinstance(value, list):
        return any(_mentions(v, port, subnet, names) for v in value)
    if isinstance(value, dict):
        if "prefix" in value:
            prefix = value["prefix"]
            try:
                return IPv4Network(f"{prefix['addr']}/{prefix['len']}", strict=False).overlaps(subnet)
            except (ValueError, KeyError, TypeError):
                return False
        if "range" in value:
            low, high = value["range"]
            if isinstance(low, int) and isinstance(high, int):
                return low <= port <= high
            return any(_mentions(v, port, subnet, names) for v in value["range"])
        if "set" in value:
            return _mentions(value["set"], port, subnet, names)
    return False


def foreign_drops(ruleset: list[dict[str, Any]] | None, subnet: IPv4Network, bridges: tuple[str, ...],
                  port: int) -> list[str]:
    """Rules outside browservm's tables that drop or reject traffic of the desktop port, the VM subnet or
    a VM bridge: described, for evidence."""
    found = []
    for obj in ruleset or []:
        rule = obj.get("rule")
        if rule is None or (rule.get("family"), rule.get("table")) in TABLES:
            continue
        expr = rule.get("expr", [])
        verdict = any("drop" in e or "reject" in e for e in expr)
        targeted = any(_mentions(e["match"].get("right"), port, subnet, bridges) for e in expr if "match" in e)
        if verdict and targeted:
            found.append(describe_rule(rule))
    return found


def foreign_drop_policies(ruleset: list[dict[str, Any]] | None) -> list[str]:
    """Base chains outside browservm's tables whose policy is drop."""
    found = []
    for obj in ruleset or []:
        chain = obj.get("chain")
        if chain is None or (chain.get("family"), chain.get("table")) in TABLES:
            continue
        if chain.get("hook") in _HOOKS and chain.get("policy") == "drop":
            found.append(f"table {chain.get('family')} {chain.get('table')} chain {chain.get('name')}: "
                         f"hook {chain.get('hook')} priority {chain.get('prio')}; policy drop")
    return found
