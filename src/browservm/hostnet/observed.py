"""What is in the VM network's namespace now, read in one go and never written: links, addresses,
bridge-port options, the bridges' forwarding entries, neighbours, sysctls, routing rules and the
whole nftables ruleset. Blocking: run it in a thread.

`host status` and the doctor both judge this one snapshot against what browservm set
(expected.py). What cannot be read is kept in `errors` instead of raised, so a caller can name it
as evidence and go on with the rest.
"""

from __future__ import annotations

import json
import socket
import subprocess
from dataclasses import dataclass, field
from ipaddress import IPv4Interface
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from browservm.errors import HostNetworkError
from browservm.hostnet.firewall import TABLES
from browservm.hostnet.links import LinkInfo, Links
from browservm.hostnet.netns import NetworkNamespace

COMMAND_TIMEOUT_S = 2.0  # `nft list ruleset`, `ip rule show`: each, within the caller's own deadline
SYSCTLS = ("net.ipv4.ip_forward", "net.bridge.bridge-nf-call-iptables")
_NUD_NAMES = {0x01: "incomplete", 0x02: "reachable", 0x04: "stale", 0x08: "delay", 0x10: "probe",
              0x20: "failed", 0x40: "noarp", 0x80: "permanent"}
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80
_NTF_STICKY = 0x40
_BRPORT = "IFLA_BRPORT_"


@dataclass(frozen=True)
class Neighbour:
    address: str
    mac: str | None
    ifindex: int
    state: str


@dataclass(frozen=True)
class FdbEntry:
    """A bridge forwarding entry: `mac` reaches port `ifindex`; how `bridge fdb` words its state."""

    mac: str
    ifindex: int
    static: bool  # NUD_NOARP ("static") or NUD_PERMANENT ("permanent"): never ages out, never moves
    sticky: bool  # NTF_STICKY: no frame from another port moves it


@dataclass
class Snapshot:
    netns_exists: bool
    links: dict[str, LinkInfo] = field(default_factory=dict)
    addresses: dict[int, list[IPv4Interface]] = field(default_factory=dict)  # by link index
    port_options: dict[int, dict[str, int]] = field(default_factory=dict)  # bridge port index -> "isolated": 1, ...
    fdb: list[FdbEntry] = field(default_factory=list)
    neighbours: list[Neighbour] = field(default_factory=list)
    sysctls: dict[str, str] = field(default_factory=dict)
    rules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # "ipv4"/"ipv6" -> `ip -j rule show`
    ruleset: list[dict[str, Any]] | None = None  # every table, ours and others'
    errors: list[str] = field(default_factory=list)

    @property
    def isolated(self) -> set[int]:
        return {index for index, options in self.port_options.items() if options.get("isolated")}

    def link_by_index(self, index: int | None) -> LinkInfo | None:
        return next((link for link in self.links.values() if link.index == index), None)

    def addresses_of(self, name: str) -> list[IPv4Interface]:
        link = self.links.get(name)
        return [] if link is None else self.addresses.get(link.index, [])

    def our_tables(self) -> list[tuple[str, str]]:
        return [(body["family"], body["name"]) for obj in self.ruleset or []
                if (body := obj.get("table")) is not None and (body.get("family"), body.get("name")) in TABLES]


def read_snapshot(netns: NetworkNamespace) -> Snapshot:
    """Blocking. Everything `host status` and the doctor compare, read and never written."""
    snapshot = Snapshot(netns_exists=netns.exists())
    if not snapshot.netns_exists:
        return snapshot
    try:
        with netns.entered():
            _read_links(snapshot, netns)
            _read_sysctls(snapshot)
            for family in ("ipv4", "ipv6"):
                rules = _read_rules(snapshot, family)
                if rules is not None:
                    snapshot.rules[family] = rules
            snapshot.ruleset = _read_ruleset(snapshot)
    except HostNetworkError as exc:
        snapshot.errors.append(str(exc))
    return snapshot


def _read_links(snapshot: Snapshot, netns: NetworkNamespace) -> None:
    try:
        links = Links(netns=netns.name)
    except OSError as exc:
        snapshot.errors.append(f"netlink: {exc.strerror or exc}")
        return
    try:
        snapshot.links = {link.name: link for link in links.all()}
    except HostNetworkError as exc:
        snapshot.errors.append(str(exc))
    finally:
        links.close()
    ipr = IPRoute()
    try:
        for message in ipr.brport("dump"):
            protinfo = message.get_attr("IFLA_PROTINFO")
            attrs = protinfo["attrs"] if protinfo is not None else []
            snapshot.port_options[int(message["index"])] = {
                name[len(_BRPORT):].lower(): value for name, value in attrs
                if name.startswith(_BRPORT) and isinstance(value, int)}
        for message in ipr.get_addr(family=socket.AF_INET):
            snapshot.addresses.setdefault(message["index"], []).append(
                IPv4Interface(f"{message.get('IFA_ADDRESS')}/{message['prefixlen']}"))
        for message in ipr.get_neighbours(family=socket.AF_INET):
            state = int(message["state"])
            snapshot.neighbours.append(Neighbour(str(message.get("NDA_DST")), message.get("NDA_LLADDR"),
                                                 int(message["ifindex"]), _NUD_NAMES.get(state, hex(state))))
        for message in ipr.get_neighbours(family=socket.AF_BRIDGE):
            mac = message.get("NDA_LLADDR")
            if mac is None or message.get("NDA_MASTER") is None:
                continue  # a port's own multicast and "self" entries: not the bridge's forwarding table
            state = int(message["state"])
            snapshot.fdb.append(FdbEntry(str(mac), int(message["ifindex"]),
                                         static=bool(state & (_NUD_NOARP | _NUD_PERMANENT)),
                                         sticky=bool(int(message["flags"]) & _NTF_STICKY)))
    except OSError as exc:
        snapshot.errors.append(f"netlink dump: {exc}")
    finally:
        ipr.close()


def _read_sysctls(snapshot: Snapshot) -> None:
    for key in SYSCTLS:
        try:
            snapshot.sysctls[key] = Path("/proc/sys", key.replace(".", "/")).read_text().strip()
        except FileNotFoundError:
            continue  # br_netfilter's switches exist only where the module is loaded
        except OSError as exc:
            snapshot.errors.append(f"sysctl {key}: {exc.strerror}")


def _command(snapshot: Snapshot, what: str, argv: list[str], empty: str) -> Any:
    """`argv`'s JSON output (`empty` when it printed nothing), or None with the reason in `errors`."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except FileNotFoundError:
        snapshot.errors.append(f"{argv[0]} is not installed")
        return None
    except subprocess.TimeoutExpired:
        snapshot.errors.append(f"{what} did not finish within {COMMAND_TIMEOUT_S:g} s")
        return None
    if proc.returncode != 0:
        snapshot.errors.append(f"{what}: {proc.stderr.strip() or f'exited {proc.returncode}'}")
        return None
    try:
        return json.loads(proc.stdout or empty)
    except ValueError as exc:
        snapshot.errors.append(f"{what}: unreadable output: {exc}")
        return None


def _read_rules(snapshot: Snapshot, family: str) -> list[dict[str, Any]] | None:
    # Through `ip`, as PolicyRules (rules.py) reads and writes them: the same words on both sides.
    listing = _command(snapshot, f"ip {family} rule show", ["ip", "-j", "-4" if family == "ipv4" else "-6",
                                                             "rule", "show"], "[]")
    return None if listing is None else list(listing)


def _read_ruleset(snapshot: Snapshot) -> list[dict[str, Any]] | None:
    document = _command(snapshot, "nft list ruleset", ["nft", "-j", "list", "ruleset"], '{"nftables": []}')
    if document is None:
        return None
    try:
        listing: list[dict[str, Any]] = document["nftables"]
    except (KeyError, TypeError) as exc:
        snapshot.errors.append(f"nft list ruleset: unreadable output: {exc}")
        return None
    return [obj for obj in listing if "metainfo" not in obj]
