"""What browservm sets on the VM network, as one description: `add_tap` takes a VM port's values
from here, and `host status` and the doctor compare every property with a snapshot of what is
there (observed.py), so one changed by hand afterwards is named with the expected and the found
value, the effect and the command that puts it back.

Set by `host up`:
  namespace   lo up (in a namespace browservm created); net.ipv4.ip_forward = 1
  bridge      per segment: a bridge, up, with the segment's gateway address; if browservm made it,
              its fixed MAC (Segment.bridge_mac) and its label (BRIDGE_ALIAS)
  routing     per segment, IPv4 and IPv6: `iif BRIDGE fwmark 0/MARK_VM_CHECKED prohibit` (rules.py);
              in a namespace browservm created, the local table looked up at LOCAL_PREF, not 0
  nftables    both tables as `host up` installed them (its recorded listing; `ruleset_mismatches`)
Set by `add_tap`, per VM (`port_props`):
  TAP         owner uid:gid; a port of the VM's bridge, up, labelled with the VM and the controller,
              in VM_PORT_GROUP, with the bridge-port options of rtnl.VM_PORT_OPTIONS; the VM's MAC a
              static, sticky forwarding entry on it; the bridge's permanent neighbour entry for the
              VM's address; the VM's elements in the bridge table's sets
Left at the kernel's defaults, and so not checked: the bridge's STP, forward delay, VLAN filtering
and multicast snooping; the other bridge-port flags (hairpin, neighbour suppression, flooding);
MTUs; a TAP's own MAC; a TAP's vnet_hdr and packet-info flags (the VMM's own open sets those).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Interface
from typing import Any

from browservm.hostnet.firewall import (
    BRIDGE_FAMILY,
    MARK_VM_CHECKED,
    VM_PORT_GROUP,
    NftObject,
    listed_ports,
    normalise_listing,
    ours,
)
from browservm.hostnet.links import BRIDGE_ALIAS, tap_alias
from browservm.hostnet.nftwords import describe, describe_expr
from browservm.hostnet.observed import Snapshot
from browservm.hostnet.rtnl import VM_PORT_OPTIONS
from browservm.hostnet.rules import LOCAL_PREF, rule_pref
from browservm.hostnet.sysctl import IP_FORWARD
from browservm.netplan import NetworkPlan, Segment

ABSENT = "absent"
EXISTS = "exists"
FIREWALL = "nftables tables inet+bridge browservm"
Reader = Callable[[Snapshot], "str | None"]  # the value as found; None: cannot be told from this snapshot


@dataclass(frozen=True)
class Prop:
    """One property browservm sets: on which piece, its name, the value it sets, and how to read it."""

    piece: str  # as `host status` names it: "bridge br0", "tap tap-...", "sysctl ...", "routing rule br0"
    name: str
    value: str
    read: Reader = field(compare=False, repr=False)
    cause: str  # the doctor's cause code (doctor/causes.py) when it differs
    breaks: str  # what a different value breaks
    repair: str  # a command that puts it back
    fatal: bool = True  # False: the path to the desktop still works, a protection or a label is lost
    cause_if_absent: str | None = None  # the cause when it is found "none" (a TAP with no master: detached)


@dataclass(frozen=True)
class Mismatch:
    prop: Prop
    found: str

    @property
    def cause(self) -> str:
        if self.found in ("none", ABSENT) and self.prop.cause_if_absent is not None:
            return self.prop.cause_if_absent
        return self.prop.cause

    @property
    def text(self) -> str:
        return f"{self.prop.name}: expected {self.prop.value}, found {self.found}"

    def evidence(self) -> list[str]:
        lines = [f"{self.prop.piece}: {self.text}"]
        if self.prop.breaks:
            lines.append(f"  this breaks: {self.prop.breaks}")
        if self.prop.repair:
            lines.append(f"  put it back: {self.prop.repair}")
        return lines


def compare(props: Iterable[Prop], snapshot: Snapshot) -> list[Mismatch]:
    """Every property whose value differs; once a piece does not exist, not its other properties."""
    gone: set[str] = set()
    mismatches = []
    for prop in props:
        if prop.piece in gone:
            continue
        found = prop.read(snapshot)
        if found is None or found == prop.value:
            continue
        mismatches.append(Mismatch(prop, found))
        if prop.name == EXISTS:
            gone.add(prop.piece)
    return mismatches


# --- the host: namespace, forwarding, bridges, routing rules ---------------------------------

def _state(up: bool) -> str:
    return "up" if up else "down"


def _link_value(name: str, value: Callable[[Any], str]) -> Reader:
    def read(snapshot: Snapshot) -> str:
        link = snapshot.links.get(name)
        return ABSENT if link is None else value(link)
    return read


def _rule_words(rule: dict[str, Any]) -> str:
    """A rule of `ip -j rule show` in `ip rule` words, without its preference."""
    words = []
    if "iif" in rule:
        words.append(f"iif {rule['iif']}")
    if "fwmark" in rule:
        mark = int(str(rule["fwmark"]), 0)
        mask = int(str(rule.get("fwmask", "0xffffffff")), 0)
        words.append(f"fwmark {mark:#x}/{mask:#x}")
    if "table" in rule:
        words.append(f"lookup {rule['table']}")
    if "action" in rule:
        words.append(str(rule["action"]))
    return " ".join(words) or "all"


def _rule_at(family: str, pref: int, value: str) -> Reader:
    def read(snapshot: Snapshot) -> str | None:
        rules = snapshot.rules.get(family)
        if rules is None:
            return None
        here = [_rule_words(rule) for rule in rules if rule.get("priority") == pref]
        return value if value in here else " | ".join(here) or ABSENT
    return read


def _local_prefs(family: str) -> Reader:
    def read(snapshot: Snapshot) -> str | None:
        rules = snapshot.rules.get(family)
        if rules is None:
            return None
        prefs = sorted(int(rule.get("priority", 0)) for rule in rules if rule.get("table") == "local")
        return ", ".join(f"pref {pref}" for pref in prefs) or ABSENT
    return read


def _sysctl(key: str) -> Reader:
    return lambda snapshot: snapshot.sysctls.get(key, ABSENT)


def _gateway_on(bridge: str, gateway: IPv4Interface) -> Reader:
    def read(snapshot: Snapshot) -> str:
        addresses = snapshot.addresses_of(bridge)
        return str(gateway) if gateway in addresses else ", ".join(str(a) for a in addresses) or "none"
    return read


def host_props(plan: NetworkPlan, *, netns: str | None, own_netns: bool, made_bridges: Collection[str]
               ) -> list[Prop]:
    """What `host up` sets in the namespace. `own_netns`: browservm created the namespace;
    `made_bridges`: the bridges it created (an adopted bridge keeps its own MAC and label)."""
    props: list[Prop] = []
    exec_prefix = f"ip netns exec {netns} " if netns else ""
    if own_netns and netns is not None:
        props.append(Prop(f"netns {netns}", "lo", "up", _link_value("lo", lambda link: _state(link.up)),
                          "netns.changed", "tools run inside the namespace cannot reach its own services",
                          f"{exec_prefix}ip link set lo up", fatal=False))
    props.append(Prop(f"sysctl {IP_FORWARD}", "value", "1", _sysctl(IP_FORWARD), "forwarding.off",
                      "VMs cannot reach anything past the host", f"{exec_prefix}sysctl -w {IP_FORWARD}=1"))
    for segment in plan.segments:
        props += _bridge_props(segment, exec_prefix, made=segment.bridge in made_bridges)
    for segment in plan.segments:
        pref = rule_pref(segment.index)
        words = f"iif {segment.bridge} fwmark 0x0/{MARK_VM_CHECKED:#x} prohibit"
        for family, flag in (("ipv4", "-4"), ("ipv6", "-6")):
            props.append(Prop(f"routing rule {segment.bridge}", f"{family} pref {pref}", words,
                              _rule_at(family, pref, words), "routing_rule.missing",
                              "with browservm's nftables tables flushed, unchecked packets from VMs would be routed",
                              f"{exec_prefix}ip {flag} rule add pref {pref} iif {segment.bridge} fwmark "
                              f"0/{MARK_VM_CHECKED:#x} prohibit"))
    if own_netns:
        for family, flag in (("ipv4", "-4"), ("ipv6", "-6")):
            props.append(Prop("routing rule local", f"{family} local table lookup", f"pref {LOCAL_PREF}",
                              _local_prefs(family), "routing_rule.changed",
                              "the local table is looked up before browservm's rules: with its nftables tables "
                              "flushed, a VM reaches the host's services unchecked",
                              f"{exec_prefix}ip {flag} rule add pref {LOCAL_PREF} lookup local; "
                              f"{exec_prefix}ip {flag} rule del pref 0 lookup local", fatal=False))
    return props


def _bridge_props(segment: Segment, exec_prefix: str, *, made: bool) -> list[Prop]:
    name = segment.bridge
    piece = f"bridge {name}"
    props = [
        Prop(piece, EXISTS, "yes", lambda s: "yes" if name in s.links else "no", "bridge.missing",
             "no VM on this segment is reachable", "browservm host up"),
        Prop(piece, "kind", "bridge", _link_value(name, lambda link: link.kind or "plain"), "bridge.not_bridge",
             "no VM can be attached to it", f"{exec_prefix}ip link del {name}; browservm host up"),
        Prop(piece, "state", "up", _link_value(name, lambda link: _state(link.up)), "bridge.down",
             "nothing reaches the VMs behind it", f"{exec_prefix}ip link set {name} up"),
        Prop(piece, "gateway address", str(segment.gateway), _gateway_on(name, segment.gateway),
             "bridge.no_address", "the host has no route to its VMs, and the VMs have no gateway",
             f"{exec_prefix}ip addr add {segment.gateway} dev {name}"),
    ]
    if made:
        props += [
            Prop(piece, "MAC", segment.bridge_mac, _link_value(name, lambda link: str(link.mac)), "bridge.changed",
                 "the guests' ARP caches hold the old gateway MAC until they expire",
                 f"{exec_prefix}ip link set {name} address {segment.bridge_mac}", fatal=False),
            Prop(piece, "alias", repr(BRIDGE_ALIAS), _link_value(name, lambda link: repr(link.alias)),
                 "bridge.changed", "browservm no longer recognises the bridge as its own",
                 f"{exec_prefix}ip link set {name} alias '{BRIDGE_ALIAS}'", fatal=False),
        ]
    return props


# --- one VM's port ---------------------------------------------------------------------------

@dataclass(frozen=True)
class VmPortSpec:
    """A VM's port as `add_tap` makes it."""

    vm_id: str
    tap: str
    bridge: str
    mac: str
    address: IPv4Address
    alias: str | None  # None: the controller is unknown here, so is the label
    group: int
    owner: tuple[int, int] | None  # uid, gid of the TAP: the VMM's user (None: unknown here)


def vm_port(vm_id: str, tap: str, bridge: str, mac: str, address: IPv4Address, *, controller: str | None,
            tap_owner: tuple[int, int] | None) -> VmPortSpec:
    alias = None if controller is None else tap_alias(vm_id, controller)
    return VmPortSpec(vm_id, tap, bridge, mac.lower(), address, alias, VM_PORT_GROUP, tap_owner)


def _master(tap: str) -> Reader:
    def read(snapshot: Snapshot) -> str:
        link = snapshot.links.get(tap)
        if link is None:
            return ABSENT
        if link.master is None:
            return "none"
        master = snapshot.link_by_index(link.master)
        return master.name if master is not None else f"link {link.master}"
    return read


def _port_option(tap: str, option: str) -> Reader:
    def read(snapshot: Snapshot) -> str:
        link = snapshot.links.get(tap)
        options = snapshot.port_options.get(link.index) if link is not None else None
        if options is None:
            return "not a bridge port"
        value = options.get(option)
        return ABSENT if value is None else ("on" if value else "off")
    return read


def _fdb(tap: str, mac: str) -> Reader:
    def read(snapshot: Snapshot) -> str:
        link = snapshot.links.get(tap)
        words = []
        for entry in snapshot.fdb:
            if entry.mac.lower() != mac:
                continue
            where = "" if link is not None and entry.ifindex == link.index else \
                f" on {getattr(snapshot.link_by_index(entry.ifindex), 'name', entry.ifindex)}"
            words.append(f"{entry.mac.lower()}{where} {'static' if entry.static else 'learned'}"
                         f"{' sticky' if entry.sticky else ''}")
        return "; ".join(words) or "none"
    return read


def _neighbour(bridge: str, address: IPv4Address) -> Reader:
    def read(snapshot: Snapshot) -> str:
        link = snapshot.links.get(bridge)
        found = [f"{(n.mac or 'no MAC').lower()} {n.state}" for n in snapshot.neighbours
                 if link is not None and n.ifindex == link.index and n.address == str(address)]
        return "; ".join(found) or "none"
    return read


def _element(tap: str, position: int) -> Reader:
    def read(snapshot: Snapshot) -> str | None:
        if snapshot.ruleset is None:
            return None
        value = listed_ports(snapshot.ruleset).get(tap, (None, None))[position]
        return "none" if value is None else f"{tap} . {str(value).lower()}"
    return read


def _tun_owner(tap: str) -> Reader:
    def read(snapshot: Snapshot) -> str | None:
        link = snapshot.links.get(tap)
        if link is None or link.tap_owner is None:
            return None  # not a TAP (a device someone else made for the VM, attach_link)
        return f"{link.tap_owner[0]}:{link.tap_owner[1]}"
    return read


def port_props(spec: VmPortSpec, *, netns: str | None, held_down: bool = False) -> list[Prop]:
    """What `add_tap` sets for one VM. `held_down`: its link is down on purpose (a restored VM whose
    VMM has no link control, until the guest took its identity)."""
    tap, piece = spec.tap, f"tap {spec.tap}"
    exec_prefix = f"ip netns exec {netns} " if netns else ""
    recreate = f"browservm vm rm {spec.vm_id}, and create it again"
    props = [
        Prop(piece, EXISTS, "yes", lambda s: "yes" if tap in s.links else "no", "tap.missing",
             "the VMM is cut off from the bridge", recreate),
        Prop(piece, "master", spec.bridge, _master(tap), "tap.wrong_bridge", "the VM is not on its segment",
             f"{exec_prefix}ip link set {tap} master {spec.bridge}", cause_if_absent="tap.detached"),
    ]
    if not held_down:
        props.append(Prop(piece, "state", "up", _link_value(tap, lambda link: _state(link.up)), "tap.down",
                          "no frame passes between the VM and the bridge", f"{exec_prefix}ip link set {tap} up"))
    if spec.alias is not None:
        props.append(Prop(piece, "alias", repr(spec.alias), _link_value(tap, lambda link: repr(link.alias)),
                          "tap.not_ours", "the controller no longer knows the TAP for this VM's (a restarted one "
                          "would leave it behind)", f"{exec_prefix}ip link set {tap} alias '{spec.alias}'",
                          fatal=False))
    props += [
        Prop(piece, "interface group", f"{spec.group:#x}", _link_value(tap, lambda link: f"{link.group:#x}"),
             "tap.changed", "the bridge table takes the VM for a foreign port: its ARP and IPv4 are dropped",
             f"{exec_prefix}ip link set {tap} group {spec.group:#x}"),
    ]
    for option, _, value in VM_PORT_OPTIONS:
        words = "on" if value else "off"
        isolated = option == "isolated"
        props.append(Prop(piece, f"bridge-port {option}", words, _port_option(tap, option),
                          "tap.not_isolated" if isolated else "tap.changed",
                          "VMs can reach each other at layer 2 if the nftables tables are flushed" if isolated else
                          "the bridge learns any source MAC the VM sends (FDB poisoning if the tables are flushed)",
                          f"{exec_prefix}bridge link set dev {tap} {option} {words}", fatal=False))
    props += [
        Prop(piece, "forwarding entry", f"{spec.mac} static sticky", _fdb(tap, spec.mac), "tap.changed",
             "the VM's MAC is not pinned to its port: a frame from another port could move it",
             f"{exec_prefix}bridge fdb replace {spec.mac} dev {tap} master static sticky", fatal=False),
        Prop(piece, f"neighbour {spec.address} on {spec.bridge}", f"{spec.mac} permanent",
             _neighbour(spec.bridge, spec.address), "tap.changed",
             "the host's neighbour entry for the VM is not pinned: ARP from elsewhere could redirect it",
             f"{exec_prefix}ip neigh replace {spec.address} lladdr {spec.mac} dev {spec.bridge} nud permanent",
             fatal=False),
        Prop(piece, "nftables vm_mac element", f"{tap} . {spec.mac}", _element(tap, 0), "tap.changed",
             "every frame from the VM is dropped (its port is checked against no MAC)",
             f"{exec_prefix}nft add element {BRIDGE_FAMILY} browservm vm_mac '{{ \"{tap}\" . {spec.mac} }}'"),
        Prop(piece, "nftables vm_ip4 element", f"{tap} . {spec.address}", _element(tap, 1), "tap.changed",
             "ARP and IPv4 from the VM are dropped (its port is checked against no address)",
             f"{exec_prefix}nft add element {BRIDGE_FAMILY} browservm vm_ip4 '{{ \"{tap}\" . {spec.address} }}'"),
    ]
    if spec.owner is not None:
        uid, gid = spec.owner
        props.append(Prop(piece, "TAP owner", f"{uid}:{gid}", _tun_owner(tap), "tap.changed",
                          "the VMM's user cannot open the TAP again (a restart of its VMM fails)",
                          f"{recreate} (`ip tuntap` cannot change an existing TAP's owner)", fatal=False))
    return props


@dataclass(frozen=True)
class Expectation:
    """What one state directory's `host up` and `add_tap` set: the host's properties, the nftables
    listing `host up` installed, and what a VM's port gets."""

    host: tuple[Prop, ...]
    firewall: list[NftObject] | None  # None: no complete installation by this state directory
    controller: str | None  # the tag in its TAPs' aliases (HostNetwork.owner)
    tap_owner: tuple[int, int] | None
    netns: str | None

    def port(self, vm_id: str, tap: str, bridge: str, mac: str, address: IPv4Address, *,
             held_down: bool = False) -> list[Prop]:
        spec = vm_port(vm_id, tap, bridge, mac, address, controller=self.controller, tap_owner=self.tap_owner)
        return port_props(spec, netns=self.netns, held_down=held_down)


def plan_expectation(plan: NetworkPlan, netns: str | None) -> Expectation:
    """What any `host up` of this plan sets, without a state directory to say what it created."""
    return Expectation(tuple(host_props(plan, netns=netns, own_netns=False, made_bridges=())), None, None, None,
                       netns)


# --- nftables: the tables against the listing `host up` recorded ------------------------------

def _label_and_words(obj: NftObject) -> tuple[str, str] | None:
    kind, body = next(iter(obj.items()))
    if not isinstance(body, dict):
        return None
    if kind == "table":
        return f"table {body.get('family')} {body.get('name')}", "present"
    where = f"{body.get('family')} {body.get('table')}"
    if kind == "chain":
        words = "regular chain" if "hook" not in body else (
            f"type {body.get('type')} hook {body.get('hook')} priority {body.get('prio')} "
            f"policy {body.get('policy')}")
        return f"chain {where} {body.get('name')}", words
    if kind == "set":
        elements = body.get("elem")
        words = f"type {body.get('type')}" + (f" flags {', '.join(body['flags'])}" if body.get("flags") else "")
        if elements:
            words += f", elements {', '.join(describe(e) for e in elements)}"
        return f"set {where} {body.get('name')}", words
    if kind == "rule":
        name = body.get("comment") or describe_expr(body)
        return f"rule {where} {body.get('chain')} {name!r}", describe_expr(body) or "no expressions"
    return None


def _keyed(listing: list[NftObject]) -> dict[str, tuple[str, str]]:
    """label -> (words, exact JSON), a repeated label numbered."""
    keyed: dict[str, tuple[str, str]] = {}
    for obj in listing:
        described = _label_and_words(obj)
        if described is None:
            continue
        label, words = described
        numbered, n = label, 1
        while numbered in keyed:
            n += 1
            numbered = f"{label} #{n}"
        keyed[numbered] = (words, json.dumps(obj, sort_keys=True))
    return keyed


def ruleset_mismatches(installed: list[NftObject], current: list[NftObject]) -> list[Mismatch]:
    """Each table, chain, set and rule of browservm's that differs from the listing `host up` installed
    (both as normalise_listing leaves them; the VMs' elements are each port's own, `port_props`).
    `current` may hold other programs' tables: only browservm's are compared."""
    want, have = _keyed(normalise_listing(ours(installed))), _keyed(normalise_listing(ours(current)))
    repair = "browservm host up (serve puts the tables back by itself)"

    def mismatch(label: str, expected: str, found: str) -> Mismatch:
        return Mismatch(Prop(FIREWALL, label, expected, lambda _: None, "nft.table_changed",
                             "browservm's checks on VM traffic are not the ones it installed", repair), found)

    found = []
    for label, (words, exact) in want.items():
        if label not in have:
            found.append(mismatch(label, words, ABSENT))
        elif have[label][1] != exact:
            other = have[label][0]
            # Differing below what the words say: the JSON tells.
            found.append(mismatch(label, exact, have[label][1]) if other == words else mismatch(label, words, other))
    found += [mismatch(label, ABSENT, words) for label, (words, _) in have.items() if label not in want]
    if not found:
        order_want = [label for label in want if label.startswith("rule ")]
        order_have = [label for label in have if label.startswith("rule ")]
        if order_want != order_have:
            first = next(i for i, (a, b) in enumerate(zip(order_want, order_have, strict=True)) if a != b)
            found.append(mismatch(f"rule order at {order_want[first]}", order_want[first], order_have[first]))
    return found
