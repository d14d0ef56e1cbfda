"""browservm's own nftables tables: what a VM may send, where it may go, NAT to the uplink.

`render_ruleset` is a pure function from the network plan to nft JSON objects;
`Nftables` only applies and lists them with `nft -j`. Both tables are replaced
in one nft transaction, so there is never a moment with half a ruleset.
`VmPorts` adds and removes one VM's set elements in-process through
libnftables, because it runs on every VM's start (about 0.06 ms, against
several ms for an `nft` process).

Table `bridge browservm` sees every frame that enters a bridge, before the
bridge learns its source address or forwards it (priority -300 on prerouting):
  prerouting  a frame from a VM port (a port in interface group VM_PORT_GROUP,
              which only `attach_port` sets) must carry that VM's MAC, ARP from
              it must claim that VM's MAC and address, IPv4 from it that VM's
              address; it may not be a DHCP server; anything but IPv4 and ARP
              (IPv6, router advertisements, VLAN tags) is dropped. Each check is
              one lookup in a set keyed by the port's name (`iifname . field`),
              so its cost does not grow with the number of VMs.
              IPv4 from a VM whose template has an egress policy of its own
              (egress.py) is marked with it here, where the port is known: its
              own policy, whether it reaches the internet, whether the
              destination is in its allowlist or denylist (sets keyed by the port
              too). The inet table's forward chain decides by these marks.
              A frame from any other port is marked FOREIGN and may not claim a
              VM address or a VM MAC.
  forward     nothing is forwarded from or to a VM port: VMs talk to the host only
              (port isolation says the same, outside nftables).
Why `iifname` and an interface group rather than `meta ibrname`: `ibrname` needs
CONFIG_NFT_BRIDGE_META, which Debian's and these machines' kernels lack (nft
refuses the rule), and bridge VLAN filtering (CONFIG_BRIDGE_VLAN_FILTERING) is
missing here too. A port without its set elements fails closed: it is in the
group, so its frames are checked, and nothing matches.

Table `inet browservm`:
  prerouting  from a VM bridge: the source must be in the VM subnet and pass
              reverse-path filtering (`fib saddr . iif`); then the packet is
              marked VM_CHECKED. A policy-routing rule outside nftables
              (hostnet/rules.py) refuses to route an unmarked packet from a VM
              bridge, so a flushed ruleset fails closed.
  input       VMs reach the host only for replies and the configured guest
              ports; frames that came from a foreign port reach nothing
  forward     no VM-to-VM traffic; VMs reach only the uplink, and through it
              only the public internet (link-local incl. 169.254.169.254,
              loopback, RFC 1918, CGNAT, multicast and reserved space are
              dropped) unless the allowlist says otherwise; the denylist wins
              over both. A VM whose template has its own policy (marked in the
              bridge table) has that policy in place of the host's allowlist; the
              host's denylist wins over it. If browservm turned forwarding on,
              nothing else is forwarded: the host routes for its VMs only.
  output      only the controller's user (root) opens connections to VMs: another
              local user's connection to a VM's desktop or agent is refused, even
              on a host where the VM network is not in a namespace of its own
  postrouting VM traffic leaving through the uplink is masqueraded
Bridge ports are also isolated (see links.py), which stops VM-to-VM frames at
layer 2 even if these tables are flushed by another tool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import subprocess
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, collapse_addresses
from typing import Any

from browservm.egress import EgressPolicy
from browservm.errors import HostNetworkError
from browservm.netplan import NetworkPlan

FAMILY = "inet"
TABLE = "browservm"
BRIDGE_FAMILY = "bridge"
TABLES = ((FAMILY, TABLE), (BRIDGE_FAMILY, TABLE))
VM_PORT_GROUP = 0x62766D01  # "bvm" 1: the interface group of every VM port
MARK_VM_CHECKED = 0x00100000  # set by inet prerouting on what a VM sent and the checks passed
MARK_FOREIGN = 0x00200000  # set by bridge prerouting on frames from a port that is not a VM's
# A VM's template's own egress policy, as the bridge table marks what the VM sends (egress.py).
MARK_OWN_EGRESS = 0x00400000  # its template has an egress policy of its own
MARK_EGRESS_INTERNET = 0x00800000  # ... which lets it reach the public internet
MARK_EGRESS_ALLOWED = 0x01000000  # the destination is in the policy's allowlist
MARK_EGRESS_DENIED = 0x02000000  # ... in its denylist
VM_SETS = ("vm_mac", "vm_ip4")  # their elements come and go with the VMs
EGRESS_SETS = ("vm_egress", "vm_egress_allow", "vm_egress_deny")  # so do these: the VMs' own egress policies
_NFT_TIMEOUT_S = 30

# Never reachable from a VM by default (RFC 6890 special-purpose space, plus private ranges).
DEFAULT_EGRESS_BLOCKED = tuple(IPv4Network(n) for n in (
    "0.0.0.0/8",        # "this network"
    "10.0.0.0/8",       # RFC 1918
    "100.64.0.0/10",    # CGNAT (RFC 6598)
    "127.0.0.0/8",      # loopback
    "169.254.0.0/16",   # link-local, incl. the cloud metadata service 169.254.169.254
    "172.16.0.0/12",    # RFC 1918
    "192.0.0.0/24",     # IETF protocol assignments
    "192.168.0.0/16",   # RFC 1918
    "198.18.0.0/15",    # benchmarking
    "224.0.0.0/4",      # multicast
    "240.0.0.0/4",      # reserved, and the limited broadcast address
))

NftObject = dict[str, Any]


def _match(left: NftObject, right: object, op: str = "==") -> NftObject:
    return {"match": {"op": op, "left": left, "right": right}}


def _one_or_set(values: list[Any]) -> object:
    return values[0] if len(values) == 1 else {"set": values}


def _meta(key: str) -> NftObject:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> NftObject:
    return {"payload": {"protocol": protocol, "field": field}}


def _prefix(network: IPv4Network) -> NftObject:
    return {"prefix": {"addr": str(network.network_address), "len": network.prefixlen}}


def _concat(*parts: NftObject) -> NftObject:
    return {"concat": list(parts)}


def _set_mark(bit: int) -> NftObject:
    return {"mangle": {"key": _meta("mark"), "value": {"|": [_meta("mark"), bit]}}}


def _has_mark(bit: int) -> NftObject:
    return _match({"&": [_meta("mark"), bit]}, 0, op="!=")


_COUNTER: NftObject = {"counter": None}
_ACCEPT: NftObject = {"accept": None}
_DROP: NftObject = {"drop": None}


class _Table:
    def __init__(self, family: str) -> None:
        self.family = family
        self.objects: list[NftObject] = [{"table": {"family": family, "name": TABLE}}]

    def chain(self, name: str, kind: str | None = None, hook: str | None = None, prio: int = 0) -> None:
        chain: NftObject = {"family": self.family, "table": TABLE, "name": name}
        if kind is not None:
            chain |= {"type": kind, "hook": hook, "prio": prio, "policy": "accept"}
        self.objects.append({"chain": chain})

    def set(self, name: str, kind: str | list[str], elements: list[Any] | None = None,
            interval: bool = False) -> None:
        body: NftObject = {"family": self.family, "table": TABLE, "name": name, "type": kind}
        if interval:
            body["flags"] = ["interval"]
        if elements:
            body["elem"] = elements
        self.objects.append({"set": body})

    def map(self, name: str, key: str, value: str) -> None:
        self.objects.append({"map": {"family": self.family, "table": TABLE, "name": name, "type": key,
                                     "map": value}})

    def rule(self, chain: str, comment: str, *expr: NftObject) -> None:
        self.objects.append({"rule": {"family": self.family, "table": TABLE, "chain": chain,
                                      "comment": comment, "expr": list(expr)}})


def _bridge_table(plan: NetworkPlan) -> list[NftObject]:
    t = _Table(BRIDGE_FAMILY)
    t.set("vm_mac", ["ifname", "ether_addr"])
    t.set("vm_ip4", ["ifname", "ipv4_addr"])
    t.map("vm_egress", "ifname", "mark")
    t.set("vm_egress_allow", ["ifname", "ipv4_addr"], interval=True)
    t.set("vm_egress_deny", ["ifname", "ipv4_addr"], interval=True)
    t.chain("prerouting", "filter", "prerouting", -300)
    t.chain("forward", "filter", "forward", -300)
    t.chain("foreign")
    t.chain("vm_arp")
    t.chain("vm_ip4")
    not_vm_port = _match(_meta("iifgroup"), VM_PORT_GROUP, op="!=")
    arp = _match(_payload("ether", "type"), "arp")
    ip4 = _match(_payload("ether", "type"), "ip")
    ip6 = _match(_payload("ether", "type"), "ip6")
    subnet = _prefix(plan.subnet)

    t.rule("prerouting", "browservm: frames from ports that are not VMs' are checked apart", not_vm_port,
           {"jump": {"target": "foreign"}})
    t.rule("prerouting", "browservm: a frame from a VM port with another source MAC (spoofing, FDB poisoning)",
           _match(_concat(_meta("iifname"), _payload("ether", "saddr")), "@vm_mac", op="!="), _COUNTER, _DROP)
    t.rule("prerouting", "browservm: ARP from a VM", arp, {"jump": {"target": "vm_arp"}})
    t.rule("prerouting", "browservm: IPv4 from a VM", ip4, {"jump": {"target": "vm_ip4"}})
    t.rule("prerouting", "browservm: router advertisement from a VM",
           ip6, _match(_payload("icmpv6", "type"), "nd-router-advert"), _COUNTER, _DROP)
    t.rule("prerouting", "browservm: IPv6 from a VM", ip6, _COUNTER, _DROP)
    t.rule("prerouting", "browservm: a VM sends only IPv4 and ARP", _COUNTER, _DROP)

    for field, value in (("htype", 1), ("ptype", "ip"), ("hlen", 6), ("plen", 4)):
        t.rule("vm_arp", f"browservm: ARP that is not Ethernet/IPv4 ({field})",
               _match(_payload("arp", field), value, op="!="), _COUNTER, _DROP)
    t.rule("vm_arp", "browservm: ARP naming another MAC than the VM's",
           _match(_concat(_meta("iifname"), _payload("arp", "saddr ether")), "@vm_mac", op="!="), _COUNTER, _DROP)
    t.rule("vm_arp", "browservm: ARP claiming another address than the VM's (ARP spoofing)",
           _match(_concat(_meta("iifname"), _payload("arp", "saddr ip")), "@vm_ip4", op="!="), _COUNTER, _DROP)
    # The host answers ARP only if the target routes (rules.py): the mark says this ARP passed its checks.
    t.rule("vm_arp", "browservm: ARP from the VM's own MAC and address", _set_mark(MARK_VM_CHECKED), _ACCEPT)

    t.rule("vm_ip4", "browservm: IPv4 from another address than the VM's (forged source)",
           _match(_concat(_meta("iifname"), _payload("ip", "saddr")), "@vm_ip4", op="!="), _COUNTER, _DROP)
    t.rule("vm_ip4", "browservm: a VM may not answer as a DHCP server",
           _match(_payload("udp", "sport"), 67), _COUNTER, _DROP)
    # The mark is set, not added to: nothing before this hook marks what a VM port sends.
    t.rule("vm_ip4", "browservm: the VM's template has an egress policy of its own",
           {"mangle": {"key": _meta("mark"), "value": {"map": {"key": _meta("iifname"), "data": "@vm_egress"}}}})
    destination = _concat(_meta("iifname"), _payload("ip", "daddr"))
    t.rule("vm_ip4", "browservm: in the allowlist of the VM's template",
           _match(destination, "@vm_egress_allow"), _set_mark(MARK_EGRESS_ALLOWED))
    t.rule("vm_ip4", "browservm: in the denylist of the VM's template",
           _match(destination, "@vm_egress_deny"), _set_mark(MARK_EGRESS_DENIED))
    t.rule("vm_ip4", "browservm: IPv4 from the VM's own MAC and address", _ACCEPT)

    t.rule("foreign", "browservm: tell the inet table this came from a port that is not a VM's",
           _set_mark(MARK_FOREIGN))
    t.rule("foreign", "browservm: a port that is not a VM's claims a VM address",
           ip4, _match(_payload("ip", "saddr"), subnet), _COUNTER, _DROP)
    t.rule("foreign", "browservm: a port that is not a VM's claims a VM address in ARP",
           arp, _match(_payload("arp", "saddr ip"), subnet), _COUNTER, _DROP)
    t.rule("foreign", "browservm: a port that is not a VM's sends from a VM MAC",
           _match({"&": [_payload("ether", "saddr"), "ff:ff:00:00:00:00"]}, "02:fc:00:00:00:00"), _COUNTER, _DROP)

    # A VM talks to the host only: the bridge forwards nothing from a VM port or to one.
    t.rule("forward", "browservm: no VM-to-VM or VM-to-other-port frames",
           _match(_meta("iifgroup"), VM_PORT_GROUP), _COUNTER, _DROP)
    t.rule("forward", "browservm: no frames from other ports to VMs",
           _match(_meta("oifgroup"), VM_PORT_GROUP), _COUNTER, _DROP)
    return t.objects


def _inet_table(plan: NetworkPlan, confine_forwarding: bool, controller_uid: int) -> list[NftObject]:
    t = _Table(FAMILY)
    bridges = _one_or_set(list(plan.bridges))
    from_vms = _match(_meta("iifname"), bridges)
    to_vms = _match(_meta("oifname"), bridges)
    replies = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    if plan.uplink is not None:
        blocked = list(collapse_addresses(DEFAULT_EGRESS_BLOCKED))
        t.set("egress_blocked", "ipv4_addr", [_prefix(n) for n in blocked], interval=True)
        t.set("egress_allow", "ipv4_addr", [_prefix(n) for n in collapse_addresses(plan.egress_allow)],
              interval=True)
        t.set("egress_deny", "ipv4_addr", [_prefix(n) for n in collapse_addresses(plan.egress_deny)],
              interval=True)
    t.chain("prerouting", "filter", "prerouting", -150)
    t.chain("input", "filter", "input", 0)
    t.chain("forward", "filter", "forward", 0)
    t.chain("output", "filter", "output", 0)
    t.chain("postrouting", "nat", "postrouting", 100)

    t.chain("from_vm")
    t.rule("prerouting", "browservm: what VMs send", from_vms, {"jump": {"target": "from_vm"}})
    t.rule("from_vm", "browservm: VMs speak IPv4 only", _match(_meta("nfproto"), "ipv6"), _COUNTER, _DROP)
    t.rule("from_vm", "browservm: a source outside the VM subnet",
           _match(_payload("ip", "saddr"), _prefix(plan.subnet), op="!="), _COUNTER, _DROP)
    # Once per connection, not per packet: an established flow keeps the source its first packet had.
    t.rule("from_vm", "browservm: reverse-path filter: a source not routed back through its bridge",
           _match({"ct": {"key": "state"}}, ["new", "invalid", "untracked"], op="in"),
           _match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, False), _COUNTER, _DROP)
    t.rule("from_vm", "browservm: checked; the policy-routing rule routes only what carries this mark",
           _set_mark(MARK_VM_CHECKED))

    t.rule("input", "browservm: frames from a port that is not a VM's reach nothing",
           from_vms, _has_mark(MARK_FOREIGN), _COUNTER, _DROP)
    t.rule("input", "browservm: replies to connections the host opened", from_vms, replies, _ACCEPT)
    if plan.guest_ports:
        gateways = _one_or_set([str(s.gateway.ip) for s in plan.segments])
        ports = _one_or_set(list(plan.guest_ports))
        t.rule("input", "browservm: the controller's guest-facing ports", from_vms,
               _match(_payload("ip", "daddr"), gateways), _match(_payload("tcp", "dport"), ports), _ACCEPT)
    t.rule("input", "browservm: VMs may not reach the host's services", from_vms, _COUNTER, _DROP)

    t.rule("forward", "browservm: no VM-to-VM traffic", from_vms, to_vms, _COUNTER, _DROP)
    t.rule("forward", "browservm: frames from a port that is not a VM's are not routed",
           from_vms, _has_mark(MARK_FOREIGN), _COUNTER, _DROP)
    if plan.uplink is not None:
        to_uplink = _match(_meta("oifname"), plan.uplink)
        daddr = _payload("ip", "daddr")
        t.rule("forward", "browservm: egress denylist", from_vms, to_uplink, _match(daddr, "@egress_deny"),
               _COUNTER, _DROP)
        own = _has_mark(MARK_OWN_EGRESS)
        t.rule("forward", "browservm: egress denylist of the VM's template", from_vms, to_uplink,
               _has_mark(MARK_EGRESS_DENIED), _COUNTER, _DROP)
        t.rule("forward", "browservm: egress allowlist of the VM's template", from_vms, to_uplink,
               _has_mark(MARK_EGRESS_ALLOWED), _ACCEPT)
        t.rule("forward", "browservm: the VM's template reaches no internet", from_vms, to_uplink,
               _match({"&": [_meta("mark"), MARK_OWN_EGRESS | MARK_EGRESS_INTERNET]}, MARK_OWN_EGRESS),
               _COUNTER, _DROP)
        t.rule("forward", "browservm: the VM's template: link-local, metadata, private, CGNAT, multicast",
               from_vms, to_uplink, own, _match(daddr, "@egress_blocked"), _COUNTER, _DROP)
        t.rule("forward", "browservm: the VM's template reaches the public internet", from_vms, to_uplink, own,
               _ACCEPT)
        t.rule("forward", "browservm: egress allowlist", from_vms, to_uplink, _match(daddr, "@egress_allow"),
               _ACCEPT)
        t.rule("forward", "browservm: not the public internet (link-local, metadata, private, CGNAT, multicast)",
               from_vms, to_uplink, _match(daddr, "@egress_blocked"), _COUNTER, _DROP)
        t.rule("forward", "browservm: VMs reach the public internet through the uplink", from_vms, to_uplink,
               _ACCEPT)
    t.rule("forward", "browservm: replies to VMs", to_vms, replies, _ACCEPT)
    t.rule("forward", "browservm: VMs reach nothing but the uplink", from_vms, _COUNTER, _DROP)
    t.rule("forward", "browservm: nothing else opens connections to VMs", to_vms, _COUNTER, _DROP)
    if confine_forwarding:
        t.rule("forward", "browservm turned forwarding on: the host routes for its VMs only, for no one else",
               _match(_meta("nfproto"), "ipv4"), _COUNTER, _DROP)

    not_controller = _match(_meta("skuid"), controller_uid, op="!=")
    new = _match({"ct": {"key": "state"}}, "new")
    t.rule("output", "browservm: only the controller connects to VMs (TCP)", to_vms, new, not_controller,
           _match(_meta("l4proto"), "tcp"), _COUNTER, {"reject": {"type": "tcp reset"}})
    t.rule("output", "browservm: only the controller connects to VMs", to_vms, new, not_controller, _COUNTER,
           {"reject": None})

    if plan.uplink is not None:
        t.rule("postrouting", "browservm: masquerade VM traffic to the uplink",
               _match(_payload("ip", "saddr"), _prefix(plan.subnet)),
               _match(_meta("oifname"), plan.uplink), {"masquerade": None})
    return t.objects


def render_ruleset(plan: NetworkPlan, *, confine_forwarding: bool = False, controller_uid: int = 0
                   ) -> list[NftObject]:
    """Both tables, without the per-VM set elements (`vm_elements` renders those)."""
    return _inet_table(plan, confine_forwarding, controller_uid) + _bridge_table(plan)


@dataclass(frozen=True)
class VmPort:
    """What one VM port may send: from `tap`, only `mac`, and as IPv4 or in ARP only `address`; and
    where to, if its template has an egress policy of its own."""

    tap: str
    mac: str
    address: IPv4Address
    egress: EgressPolicy | None = None

    @property
    def egress_mark(self) -> int:
        """What the bridge table marks this port's IPv4 with (its template's own policy)."""
        assert self.egress is not None
        return MARK_OWN_EGRESS | (MARK_EGRESS_INTERNET if self.egress.internet else 0)

    @property
    def egress_elements(self) -> dict[str, list[Any]]:
        """The egress sets' elements for this port, in nft's JSON form."""
        if self.egress is None:
            return {}
        return {"vm_egress": [[self.tap, self.egress_mark]],
                "vm_egress_allow": [{"concat": [self.tap, _prefix(n)]} for n in self.egress.allow],
                "vm_egress_deny": [{"concat": [self.tap, _prefix(n)]} for n in self.egress.deny]}


def vm_elements(ports: list[VmPort]) -> list[NftObject]:
    values: dict[str, list[Any]] = {name: [] for name in VM_SETS + EGRESS_SETS}
    for port in ports:
        values["vm_mac"].append({"concat": [port.tap, port.mac]})
        values["vm_ip4"].append({"concat": [port.tap, str(port.address)]})
        for name, elements in port.egress_elements.items():
            values[name] += elements
    return [{"element": {"family": BRIDGE_FAMILY, "table": TABLE, "name": name, "elem": elements}}
            for name, elements in values.items() if elements]


def ruleset_digest(objects: list[NftObject]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


def normalise_listing(listing: list[NftObject]) -> list[NftObject]:
    """A listing without what changes on its own: handles, counter values, nft's version, VMs' elements."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            if "counter" in value and len(value) == 1:
                return {"counter": None}
            return {k: clean(v) for k, v in value.items() if k != "handle"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    cleaned = []
    for obj in listing:
        if "metainfo" in obj:
            continue
        kind = "map" if "map" in obj else "set"
        body = obj.get(kind)
        if body is not None and body.get("name") in VM_SETS + EGRESS_SETS and body.get("family") == BRIDGE_FAMILY:
            cleaned.append(clean({kind: {k: v for k, v in body.items() if k != "elem"}}))
        else:
            cleaned.append(clean(obj))
    return cleaned


def listed_ports(listing: list[NftObject]) -> dict[str, tuple[str | None, str | None]]:
    """TAP -> (MAC, address) as the VM sets hold them."""
    found: dict[str, list[str | None]] = {}
    for obj in listing:
        body = obj.get("set")
        if body is None or body.get("family") != BRIDGE_FAMILY or body.get("name") not in VM_SETS:
            continue
        position = VM_SETS.index(body["name"])
        for listed in body.get("elem", []):
            # An element with options (a comment, a timeout) is wrapped in {"elem": {"val": ...}}.
            elem = listed["elem"]["val"] if "elem" in listed else listed
            tap, value = elem["concat"]
            found.setdefault(tap, [None, None])[position] = value
    return {tap: (mac, address) for tap, (mac, address) in found.items()}


def listed_egress(listing: list[NftObject]) -> dict[str, EgressPolicy]:
    """TAP -> its own egress policy, as the egress sets hold it (a TAP with the host's is not named)."""
    marks: dict[str, int] = {}
    lists: dict[tuple[str, str], list[IPv4Network]] = {}
    for obj in listing:
        body = obj.get("map", obj.get("set"))
        if body is None or body.get("family") != BRIDGE_FAMILY or body.get("name") not in EGRESS_SETS:
            continue
        for listed in body.get("elem", []):
            elem = listed["elem"]["val"] if isinstance(listed, dict) and "elem" in listed else listed
            if body["name"] == "vm_egress":
                tap, mark = elem
                marks[tap] = int(mark)
                continue
            tap, network = elem["concat"]
            if isinstance(network, dict):  # a prefix; a /32 is listed as its address
                network = f"{network['prefix']['addr']}/{network['prefix']['len']}"
            lists.setdefault((tap, body["name"]), []).append(IPv4Network(network))
    return {tap: EgressPolicy(internet=bool(mark & MARK_EGRESS_INTERNET),
                              allow=tuple(lists.get((tap, "vm_egress_allow"), [])),
                              deny=tuple(lists.get((tap, "vm_egress_deny"), [])))
            for tap, mark in marks.items()}


class Nftables:
    """Runs `nft -j` in the namespace of the calling thread."""

    def __init__(self, netns: str | None = None, nft: str = "nft") -> None:
        self._netns = netns  # for error messages only
        self._nft = nft

    def _run(self, step: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self._nft, "-j", *args], input=stdin, capture_output=True,
                                  text=True, timeout=_NFT_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise HostNetworkError(step, f"{self._nft!r} is not installed (apt-get install nftables)",
                                   netns=self._netns) from None
        except subprocess.TimeoutExpired:
            raise HostNetworkError(step, f"nft did not finish within {_NFT_TIMEOUT_S} s", netns=self._netns) from None

    def replace_table(self, objects: list[NftObject], elements: list[NftObject] | None = None) -> None:
        """Install `objects` (and `elements`) as the whole of our tables, atomically."""
        commands: list[NftObject] = []
        for family, name in TABLES:
            table = {"table": {"family": family, "name": name}}
            commands += [{"add": table}, {"delete": table}]
        commands += [{"add": obj} for obj in objects + (elements or [])]
        proc = self._run("install nftables tables", ["-f", "-"], json.dumps({"nftables": commands}))
        if proc.returncode != 0:
            raise HostNetworkError("install nftables tables", proc.stderr.strip() or f"nft exited {proc.returncode}",
                                   netns=self._netns)

    def list_table(self) -> list[NftObject] | None:
        """Our tables as nft lists them (VMs' elements included), or None when neither exists."""
        proc = self._run("list nftables tables", ["list", "ruleset"])
        if proc.returncode != 0:
            raise HostNetworkError("list nftables tables", proc.stderr.strip(), netns=self._netns)
        try:
            listing: list[NftObject] = json.loads(proc.stdout or '{"nftables": []}')["nftables"]
        except (ValueError, KeyError) as exc:
            raise HostNetworkError("list nftables tables", f"unreadable nft output: {exc}",
                                   netns=self._netns) from exc
        ours = [obj for obj in listing if _is_ours(obj)]
        return ours or None

    def delete_table(self) -> bool:
        """Delete our tables; False if neither was there."""
        listing = self.list_table()
        if listing is None:
            return False
        present = [{"delete": obj} for obj in listing if "table" in obj]
        proc = self._run("delete nftables tables", ["-f", "-"], json.dumps({"nftables": present}))
        if proc.returncode != 0:
            raise HostNetworkError("delete nftables tables", proc.stderr.strip(), netns=self._netns)
        return True


def ours(listing: list[NftObject]) -> list[NftObject]:
    """The objects of browservm's tables in a listing of the whole ruleset."""
    return [obj for obj in listing if _is_ours(obj)]


def _is_ours(obj: NftObject) -> bool:
    for kind, body in obj.items():
        if kind == "metainfo" or not isinstance(body, dict):
            return False
        table = body.get("name") if kind == "table" else body.get("table")
        return (body.get("family"), table) in TABLES
    return False


class _Lib:
    """libnftables (Debian's libnftables1, a dependency of the nft program) through ctypes.

    Debian's python3-nftables binding is for the system Python, not our venv,
    and is itself this ctypes wrapper.
    """

    def __init__(self) -> None:
        path = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            raise HostNetworkError("load libnftables", f"{exc} (apt-get install libnftables1)") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        self._lib = lib
        # One command at a time per process: a context is cheap (25 us), libnftables' globals are not shared safely.
        self._lock = threading.Lock()

    def run(self, command: str) -> str | None:
        """Run `command` in the namespace of the calling thread; None on success, else nft's error text."""
        with self._lock:
            # A context per call: its netlink socket belongs to the namespace the thread is in now.
            ctx = self._lib.nft_ctx_new(0)
            if not ctx:
                return "nft_ctx_new failed"
            try:
                self._lib.nft_ctx_buffer_output(ctx)
                self._lib.nft_ctx_buffer_error(ctx)
                if self._lib.nft_run_cmd_from_buffer(ctx, command.encode()) == 0:
                    return None
                error = self._lib.nft_ctx_get_error_buffer(ctx)
                return (error or b"").decode(errors="replace").strip() or "nft failed"
            finally:
                self._lib.nft_ctx_free(ctx)


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def _library() -> _Lib:
    global _lib  # noqa: PLW0603 - loaded once per process, on first use
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


class VmPorts:
    """One VM port's set elements, added or removed in one nft transaction, in-process."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns  # for error messages only

    def add(self, port: VmPort) -> None:
        error = _library().run("".join(f"add {command}\n" for command in _elements(port)))
        if error is not None:
            if "No such file or directory" in error:
                error = f"browservm's nftables table {BRIDGE_FAMILY} {TABLE} is missing; run `browservm host up`"
            raise HostNetworkError("allow the VM's addresses on its port", error.splitlines()[0],
                                   device=port.tap, netns=self._netns)

    def remove(self, port: VmPort) -> None:
        """Remove the port's elements; those already gone are no error."""
        lib = _library()
        commands = [f"delete {command}" for command in _elements(port)]
        if lib.run("".join(f"{command}\n" for command in commands)) is None:
            return
        # One of them is missing (a half-made port, a restored table): a batch is all or nothing, so one by one.
        for command in commands:
            error = lib.run(command)
            if error is not None and "No such file or directory" not in error:
                raise HostNetworkError("remove the VM's addresses from its port", error,
                                       device=port.tap, netns=self._netns)


def _elements(port: VmPort) -> list[str]:
    """`element ...` commands, one element each, for the port's elements in nft's language."""
    def element(name: str, value: str) -> str:
        return f"element {BRIDGE_FAMILY} {TABLE} {name} {{ {value} }}"
    tap = f'"{port.tap}"'
    commands = [element("vm_mac", f"{tap} . {port.mac}"), element("vm_ip4", f"{tap} . {port.address}")]
    if port.egress is not None:
        commands.append(element("vm_egress", f"{tap} : {port.egress_mark:#x}"))
        commands += [element("vm_egress_allow", f"{tap} . {n}") for n in port.egress.allow]
        commands += [element("vm_egress_deny", f"{tap} . {n}") for n in port.egress.deny]
    return commands
