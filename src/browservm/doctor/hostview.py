"""A read-only look at the VM network's namespace: links, addresses, bridge ports, neighbours,
sysctls and the whole nftables ruleset, taken in one go (blocking: run it in a thread).

Nothing here writes: netlink dumps, /proc/sys reads and `nft -j list ruleset` with a deadline
of its own. What cannot be read is kept in `errors` instead of raised, so the doctor can name
it as evidence and go on with the rest.
"""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from browservm.errors import HostNetworkError
from browservm.hostnet.firewall import TABLES
from browservm.hostnet.links import LinkInfo, Links
from browservm.hostnet.netns import NetworkNamespace

NFT_TIMEOUT_S = 2.0
_NUD_PERMANENT = 0x80
_NUD_NAMES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe",
              0x20: "failed", 0x40: "noarp", 0x80: "permanent"}


@dataclass(frozen=True)
class Neighbour:
    address: str
    mac: str | None
    ifindex: int
    state: str


@dataclass
class HostView:
    netns_exists: bool
    links: dict[str, LinkInfo] = field(default_factory=dict)
    addresses: dict[int, list[IPv4Interface]] = field(default_factory=dict)  # by link index
    isolated: set[int] = field(default_factory=set)
    neighbours: list[Neighbour] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    ruleset: list[dict[str, Any]] | None = None  # every table, ours and others'
    errors: list[str] = field(default_factory=list)

    def link_by_index(self, index: int | None) -> LinkInfo | None:
        return next((link for link in self.links.values() if link.index == index), None)

    def addresses_of(self, name: str) -> list[IPv4Interface]:
        link = self.links.get(name)
        return [] if link is None else self.addresses.get(link.index, [])

    def our_tables(self) -> list[tuple[str, str]]:
        return [(body["family"], body["name"]) for obj in self.ruleset or []
                if (body := obj.get("table")) is not None and (body.get("family"), body.get("name")) in TABLES]


SYSCTLS = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables")


def read_host_view(netns: NetworkNamespace) -> HostView:
    """Blocking. Everything the doctor needs to know about the namespace, read and never written."""
    view = HostView(netns_exists=netns.exists())
    if not view.netns_exists:
        return view
    try:
        with netns.entered():
            _read_links(view, netns)
            _read_sysctls(view)
            view.ruleset = _read_ruleset(view)
    except HostNetworkError as exc:
        view.errors.append(str(exc))
    return view


def _read_links(view: HostView, netns: NetworkNamespace) -> None:
    try:
        links = Links(netns=netns.name)
    except OSError as exc:
        view.errors.append(f"netlink: {exc.strerror or exc}")
        return
    try:
        view.links = {link.name: link for link in links.all()}
        view.isolated = links.isolated_ports()
    except HostNetworkError as exc:
        view.errors.append(str(exc))
    finally:
        links.close()
    ipr = IPRoute()
    try:
        for message in ipr.get_addr(family=socket.AF_INET):
            view.addresses.setdefault(message["index"], []).append(
                IPv4Interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}"))
        for message in ipr.get_neighbours(family=socket.AF_INET):
            state = int(message["state"])
            view.neighbours.append(Neighbour(str(message.get("NDA_DST")), message.get("NDA_LLADDR"),
                                             int(message["ifindex"]),
                                             _NUD_NAMES.get(state, hex(state))))
    except OSError as exc:
        view.errors.append(f"netlink dump: {exc}")
    finally:
        ipr.close()


def _read_sysctls(view: HostView) -> None:
    for key in SYSCTLS:
        try:
            view.sysctls[key] = Path("/proc/sys", key.replace(".", "/")).read_text().strip()
        except FileNotFoundError:
            continue  # br_netfilter's switches exist only where the module is loaded
        except OSError as exc:
            view.errors.append(f"sysctl {key}: {exc.strerror}")


def _read_ruleset(view: HostView) -> list[dict[str, Any]] | None:
    try:
        proc = subprocess.run(["nft", "-j", "list", "ruleset"], capture_output=True, text=True,
                              timeout=NFT_TIMEOUT_S, check=False)
    except FileNotFoundError:
        view.errors.append("nft is not installed (apt-get install nftables)")
        return None
    except subprocess.TimeoutExpired:
        view.errors.append(f"nft list ruleset did not finish within {NFT_TIMEOUT_S:g} s")
        return None
    if proc.returncode != 0:
        view.errors.append(f"nft list ruleset: {proc.stderr.strip() or f'exited {proc.returncode}'}")
        return None
    try:
        listing: list[dict[str, Any]] = json.loads(proc.stdout or '{"nftables": []}')["nftables"]
    except (ValueError, KeyError) as exc:
        view.errors.append(f"nft list ruleset: unreadable output: {exc}")
        return None
    return [obj for obj in listing if "metainfo" not in obj]


# --- other firewalls: what in someone else's tables would stop VM traffic -----------------------

_HOOKS = ("prerouting", "input", "forward", "output", "postrouting")


def _describe(value: Any) -> str:
    """An nft JSON expression in words close to nft's own syntax (for evidence)."""
    if isinstance(value, dict):
        if "payload" in value:
            payload = value["payload"]
            return f"{payload.get('protocol', '')} {payload.get('field', '')}".strip()
        if "meta" in value:
            return str(value["meta"].get("key"))
        if "prefix" in value:
            return f"{value['prefix']['addr']}/{value['prefix']['len']}"
        if "set" in value:
            return "{ " + ", ".join(_describe(v) for v in value["set"]) + " }"
        if "range" in value:
            low, high = value["range"]
            return f"{_describe(low)}-{_describe(high)}"
        if "match" in value:
            match = value["match"]
            op = "" if match.get("op") in ("==", "in") else f"{match.get('op')} "
            return f"{_describe(match.get('left'))} {op}{_describe(match.get('right'))}"
        key = next(iter(value), "")
        return key if value[key] is None else f"{key} {_describe(value[key])}" if key in ("jump", "goto") else key
    if isinstance(value, list):
        return " ".join(_describe(v) for v in value)
    return str(value)


def describe_rule(rule: dict[str, Any]) -> str:
    words = [_describe(expr) for expr in rule.get("expr", []) if "counter" not in expr]
    return (f"table {rule.get('family')} {rule.get('table')} chain {rule.get('chain')}: "
            + " ".join(word for word in words if word))


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
