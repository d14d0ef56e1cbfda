"""The host side of the VM network: set up, checked, torn down, one TAP per VM.

`up()` makes what the plan needs and records in the store what *it* creates;
`down()` removes exactly those records' objects, so a bridge, address or
namespace that was there before browservm is left alone. Both are idempotent:
a second `up()` reports every piece unchanged and changes nothing.

Each object is recorded *before* it is created, so a crash between the two
leaves a record of an object that may not exist (which `down` passes over),
never an object of ours that nothing records.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from browservm.errors import HostNetworkError
from browservm.faults import crash_point
from browservm.hostnet.expected import (
    FIREWALL,
    Expectation,
    Mismatch,
    compare,
    host_props,
    ruleset_mismatches,
    vm_port,
)
from browservm.hostnet.firewall import (
    Nftables,
    VmPort,
    VmPorts,
    listed_ports,
    normalise_listing,
    ours,
    render_ruleset,
    ruleset_digest,
    vm_elements,
)
from browservm.hostnet.links import BRIDGE_ALIAS, LinkInfo, Links, attach_port, create_tap
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.observed import Snapshot, read_snapshot
from browservm.hostnet.rtnl import RtnlSocket
from browservm.hostnet.rules import PolicyRules, rule_pref
from browservm.hostnet.sysctl import IP_FORWARD, Sysctl
from browservm.ids import names_for
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan, Segment
from browservm.store import Store

__all__ = ["FIREWALL", "IP_FORWARD", "Change", "Check", "HostNetwork"]
_DRIFT_KEPT = 20  # drift events kept in the store
_log = logging.getLogger("browservm.hostnet")


@dataclass(frozen=True)
class Change:
    """What `up()` or `down()` did to one piece: created, updated, unchanged, removed, kept."""

    piece: str
    action: str
    detail: str = ""


@dataclass(frozen=True)
class Check:
    """One piece as `status()` found it."""

    piece: str
    ok: bool
    detail: str


class _Records:
    """The host objects browservm created, in the store."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, kind: str, name: str, detail: str = "") -> None:
        with self._store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO host_objects (kind, name, detail, created_at) VALUES (?, ?, ?, ?)",
                       (kind, name, detail, time.time()))

    def get(self, kind: str, name: str) -> str | None:
        rows = self._store.read("SELECT detail FROM host_objects WHERE kind = ? AND name = ?", (kind, name))
        return str(rows[0][0]) if rows else None

    def names(self, kind: str) -> list[str]:
        return [str(r[0]) for r in self._store.read("SELECT name FROM host_objects WHERE kind = ? ORDER BY name",
                                                    (kind,))]

    def remove(self, kind: str, name: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM host_objects WHERE kind = ? AND name = ?", (kind, name))

    @contextmanager
    def intent(self, kind: str, name: str, detail: str = "") -> Iterator[None]:
        """Record the object the block is about to create, before it creates it.

        If the block fails with HostNetworkError, the kernel or nft refused and
        nothing was created, so a record this call added is taken back (the name
        may be someone else's object that appeared in between). On anything else
        (an interrupt, a crash) the record stays: `down` tolerates an object that
        never got created, but could not find one that nothing records.
        """
        added = self.get(kind, name) is None
        if added:
            self.add(kind, name, detail)
        try:
            yield
        except HostNetworkError:
            if added:
                self.remove(kind, name)
            raise


P = ParamSpec("P")
R = TypeVar("R")


def _confined(method: Callable[Concatenate[HostNetwork, P], R]) -> Callable[Concatenate[HostNetwork, P], R]:
    """Run the method on the HostNetwork's own thread.

    pyroute2's synchronous API drives an asyncio loop of its own, which cannot
    run inside a caller's running loop (the VM manager's); one thread of its own
    also keeps the netlink socket out of concurrent use.
    """
    def confined(self: HostNetwork, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if threading.get_ident() == self._worker_thread:
            return method(self, *args, **kwargs)
        return self._worker.submit(method, self, *args, **kwargs).result()
    functools.update_wrapper(confined, method)
    return confined


class _PortLock:
    """Held while VM ports and their set elements change and while our tables are replaced, by every
    process of this state directory at once (a thread lock, then an flock): `vm create` processes
    and a `serve` each write the same sets, and a table replaced from a port list read a moment
    earlier would drop the elements of a port another process has just added."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._threads = threading.Lock()

    def __enter__(self) -> None:
        self._threads.acquire()
        try:
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._threads.release()
            raise

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # the flock goes with the descriptor
        self._threads.release()


class HostNetwork:
    def __init__(self, plan: NetworkPlan, store: Store, netns: NetworkNamespace, *,
                 tap_owner: tuple[int, int] = (0, 0), nft: Nftables | None = None,
                 sysctl: Sysctl | None = None, adopt_bridge: bool = False) -> None:
        self.plan = plan
        self.netns = netns
        self._adopt_bridge = adopt_bridge
        self._ports = VmPorts(netns.name)
        self._rules = PolicyRules(netns.name)
        # Held while a VM port and its set elements change, and while the tables are replaced,
        # so a restore never drops the elements of a port being added.
        self._port_lock = _PortLock(store.path.parent / "hostnet.lock")
        self._store = store
        self._records = _Records(store)
        self._tap_owner = tap_owner
        self._nft = nft or Nftables(netns=netns.name)
        self._sysctl = sysctl or Sysctl(netns=netns.name)
        self._links: Links | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostnet")
        self._worker_thread = self._worker.submit(threading.get_ident).result()
        self._closed = False
        store.claim("netns", netns.name or "")
        # Tags the TAPs this controller makes, so it never takes another controller's TAPs for its own.
        self.owner = hashlib.sha256(str(store.path.resolve()).encode()).hexdigest()[:8]

    def close(self) -> None:
        if self._closed:
            return
        self._close_links()
        self._worker.shutdown()
        self._closed = True

    @_confined
    def _close_links(self) -> None:
        if self._links is not None:
            self._links.close()
            self._links = None

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _inside(self) -> Iterator[Links]:
        with self.netns.entered():
            if self._links is None:
                self._links = Links(netns=self.netns.name)  # its socket stays in the namespace
            yield self._links

    # --- host up / status / down -------------------------------------------------

    @_confined
    def up(self) -> list[Change]:
        changes: list[Change] = []
        if self.netns.name is not None:
            changes.append(self._up_netns(self.netns.name))
        with self._inside() as links:
            if self._records.names("netns"):
                # A namespace starts with loopback down; tools run inside it (ip netns exec) expect it up.
                lo = links.get("lo")
                if lo is not None and not lo.up:
                    links.set_up(lo)
            changes.append(self._up_forwarding())
            self._check_no_overlap(links)
            for segment in self.plan.segments:
                changes += self._up_bridge(links, segment)
            changes += [self._up_rule(segment) for segment in self.plan.segments]
            with self._port_lock:
                changes.append(self._up_firewall(links))
        return changes

    def _up_netns(self, name: str) -> Change:
        piece = f"netns {name}"
        if self.netns.exists():
            return Change(piece, "unchanged")
        # Not through `intent`: a failed creation can leave the mount point file behind, which is ours.
        recorded = self._records.get("netns", name) is not None
        self._records.add("netns", name)
        if not self.netns.create():
            if not recorded:
                self._records.remove("netns", name)  # another program made it in between: not ours
            return Change(piece, "unchanged")
        crash_point("host.netns.created")
        return Change(piece, "created")

    def _up_forwarding(self) -> Change:
        current = self._sysctl.read(IP_FORWARD)
        if current == "1":
            return Change(f"sysctl {IP_FORWARD}", "unchanged", "1")
        # An earlier, interrupted run may have recorded the value it found; that one is the one to restore.
        with self._records.intent("sysctl", IP_FORWARD, current):
            self._sysctl.write(IP_FORWARD, "1")
        crash_point("host.sysctl.created")
        return Change(f"sysctl {IP_FORWARD}", "updated", f"{current} -> 1")

    def _check_no_overlap(self, links: Links) -> None:
        """The VM subnet must be nobody else's: no address of another link in it, and no route into it
        (a VPN or a static route to a LAN behind another interface would be shadowed, or would
        shadow the VMs)."""
        ours = set(self.plan.bridges)
        names = {}
        for link in links.all():
            names[link.index] = link.name
            if link.name in ours:
                continue
            for address in links.addresses(link):
                if address.network.overlaps(self.plan.subnet):
                    raise HostNetworkError(
                        "check subnet", f"{address} on {link.name} overlaps the VM subnet {self.plan.subnet}; "
                        "configure another subnet", device=link.name, netns=self.netns.name)
        for destination, oif in links.routes():
            device = names.get(oif) if oif is not None else None
            if device not in ours and destination.overlaps(self.plan.subnet):
                raise HostNetworkError(
                    "check subnet", f"a route to {destination}{f' via {device}' if device else ''} overlaps the VM "
                    f"subnet {self.plan.subnet}; configure another subnet", device=device, netns=self.netns.name)

    def _up_bridge(self, links: Links, segment: Segment) -> list[Change]:
        changes = []
        piece = f"bridge {segment.bridge}"
        bridge = links.get(segment.bridge)
        if bridge is None:
            with self._records.intent("bridge", segment.bridge):
                bridge = links.create_bridge(segment.bridge, segment.bridge_mac)
            crash_point("host.bridge.created")
            links.set_up(bridge, alias=BRIDGE_ALIAS)
            changes.append(Change(piece, "created", segment.bridge_mac))
        elif bridge.kind != "bridge":
            raise HostNetworkError("check bridge", f"exists but is a {bridge.kind or 'plain'} link, not a bridge",
                                   device=segment.bridge, netns=self.netns.name)
        elif (foreign := self._not_ours(links, bridge)) is not None:
            if not self._adopt_bridge:
                raise HostNetworkError(
                    "check bridge", f"exists and was not created by browservm ({foreign}); it may be this "
                    "host's LAN bridge: configure another --bridge, or pass --adopt-bridge to use it anyway",
                    device=segment.bridge, netns=self.netns.name)
            _log.warning("adopting bridge %s, which browservm did not create: %s", segment.bridge, foreign)
            if not bridge.up:
                links.set_up(bridge)
            changes.append(Change(piece, "adopted", f"WARNING: not created by browservm: {foreign}"))
        elif not bridge.up:
            # If ours, label it as creating it would have: an interrupted `up` can leave it down and unlabelled.
            ours = self._records.get("bridge", segment.bridge) is not None
            links.set_up(bridge, alias=BRIDGE_ALIAS if ours else None)
            changes.append(Change(piece, "updated", "set up"))
        else:
            changes.append(Change(piece, "unchanged"))
        gateway = segment.gateway
        addresses = links.addresses(bridge)
        if gateway in addresses:
            changes.append(Change(f"address {gateway} on {segment.bridge}", "unchanged"))
        else:
            with self._records.intent("address", f"{segment.bridge} {gateway}"):
                links.add_address(bridge, gateway)
            crash_point("host.address.created")
            changes.append(Change(f"address {gateway} on {segment.bridge}", "created"))
        return changes

    def _not_ours(self, links: Links, bridge: LinkInfo) -> str | None:
        """What makes an existing bridge someone else's, or None if browservm made it.

        Ours: recorded as created by this state directory, or labelled by any
        browservm. Anything else (commonly a KVM host's LAN bridge) is named
        with its ports and addresses.
        """
        if self._records.get("bridge", bridge.name) is not None or bridge.alias == BRIDGE_ALIAS:
            return None
        ports = sorted(link.name for link in links.all() if link.master == bridge.index)
        addresses = [str(a) for a in links.addresses(bridge)]
        what = [f"ports {', '.join(ports)}" if ports else "no ports",
                f"addresses {', '.join(addresses)}" if addresses else "no addresses",
                f"alias {bridge.alias!r}" if bridge.alias else "no browservm label"]
        return "; ".join(what)

    def _up_rule(self, segment: Segment) -> Change:
        piece = f"routing rule {segment.bridge}"
        pref = rule_pref(segment.index)
        present = self._rules.present(segment.bridge, pref)
        # In a namespace of our own, local delivery too waits for the check (rules.py).
        move_local = bool(self._records.names("netns")) and self._rules.local_first()
        if present and not move_local:
            return Change(piece, "unchanged")
        if not present:
            with self._records.intent("rule", f"{segment.bridge} {pref}"):
                self._rules.add(segment.bridge, pref)
        if move_local:
            self._rules.move_local_after_ours()
        return Change(piece, "updated" if present else "created", "unchecked packets from VMs are not routed")

    def _desired_firewall(self) -> list[dict[str, object]]:
        # If browservm turned forwarding on, it must not turn this host into a router for anyone else.
        confine = self._records.get("sysctl", IP_FORWARD) is not None
        return render_ruleset(self.plan, confine_forwarding=confine, controller_uid=os.geteuid())

    def _vm_ports(self, links: Links) -> list[VmPort]:
        """The VM ports that exist now (attached TAPs of ours with a lease), as the sets must hold them."""
        leases = {lease.vm_id: lease for lease in self._leases()}
        ports = []
        for link, vm_id in self._our_taps(links, list(leases.values())).items():
            lease = leases.get(vm_id)
            if lease is not None and link.name == lease.tap and link.master is not None:
                ports.append(VmPort(lease.tap, lease.mac, lease.address.ip))
        return ports

    def _up_firewall(self, links: Links, piece: str = FIREWALL) -> Change:
        desired = self._desired_firewall()
        digest = ruleset_digest(desired)
        recorded = self._records.get("nft", "inet browservm")
        current = self._nft.list_table()
        ports = self._vm_ports(links)
        if recorded is not None and current is not None:
            record = json.loads(recorded)
            if record["digest"] == digest and record["listing"] == normalise_listing(current) \
                    and self._missing_elements(current, ports) == []:
                return Change(piece, "unchanged", digest)
        # No listing yet: the table is only known once nft lists it back, after the install.
        with self._records.intent("nft", "inet browservm", json.dumps({"digest": digest, "listing": None})):
            # The running VMs' elements go in the same transaction: their ports are never without them.
            self._nft.replace_table(desired, vm_elements(ports))
        crash_point("host.nft.created")
        installed = self._nft.list_table()
        if installed is None:
            raise HostNetworkError("install nftables table", "nft reported success but the table is missing",
                                   netns=self.netns.name)
        self._records.add("nft", "inet browservm",
                          json.dumps({"digest": digest, "listing": normalise_listing(installed)}))
        return Change(piece, "created" if current is None else "updated", digest)

    @staticmethod
    def _missing_elements(listing: list[dict[str, object]], ports: list[VmPort]) -> list[str]:
        held = listed_ports(listing)
        return [p.tap for p in ports if held.get(p.tap) != (p.mac, str(p.address))]

    # --- drift: someone else changed our tables ----------------------------------------

    @_confined
    def check_and_restore(self) -> list[Change]:
        """Put back our tables and routing rules if anything removed or changed them; what it restored.

        Blocking, for a background task every few seconds: when nothing drifted
        it costs one `nft list ruleset` and one `ip rule show` (a few ms). Each
        restoration is logged and recorded in the store (`drift_events`), and
        `status()` reports drift until it is repaired. Does nothing before `host up`.
        """
        if self._records.get("nft", "inet browservm") is None or not self.netns.exists():
            return []
        changes = []
        with self._inside() as links:
            for segment in self.plan.segments:
                if self._records.get("rule", f"{segment.bridge} {rule_pref(segment.index)}") is not None:
                    change = self._up_rule(segment)
                    if change.action != "unchanged":
                        changes.append(Change(change.piece, "restored", "it was removed"))
            with self._port_lock:
                check = self._check_firewall(links)
                if not check.ok:
                    change = self._up_firewall(links)
                    if change.action != "unchanged":
                        changes.append(Change(FIREWALL, "restored", check.detail))
        for change in changes:
            _log.warning("host network drift: %s %s (%s)", change.action, change.piece, change.detail)
            self._record_drift(change)
        return changes

    def _record_drift(self, change: Change) -> None:
        now = time.time()
        self._records.add("drift", f"{now:.6f}", f"{change.piece}: {change.detail}")
        for stale in self._records.names("drift")[:-_DRIFT_KEPT]:
            self._records.remove("drift", stale)

    def drift_events(self) -> list[tuple[float, str]]:
        """(time, what was restored) for the latest restorations, oldest first."""
        return [(float(name), self._records.get("drift", name) or "") for name in self._records.names("drift")]

    @_confined
    def expected(self) -> Expectation:
        """What this state directory's `host up` and `add_tap` set, for `status` and the doctor to compare."""
        record = self._records.get("nft", "inet browservm")
        listing = json.loads(record)["listing"] if record is not None else None
        props = host_props(self.plan, netns=self.netns.name, own_netns=bool(self._records.names("netns")),
                           made_bridges=self._records.names("bridge"))
        return Expectation(tuple(props), listing, self.owner, self._tap_owner, self.netns.name)

    @_confined
    def status(self) -> list[Check]:
        checks: list[Check] = []
        if self.netns.name is not None and not self.netns.exists():
            return [Check(f"netns {self.netns.name}", False, "missing")]
        snapshot = read_snapshot(self.netns)
        expectation = self.expected()
        props = _by_piece(compare(expectation.host, snapshot))
        ok_details = {f"netns {self.netns.name}": "present", f"sysctl {IP_FORWARD}": "1"}
        for segment in self.plan.segments:
            ok_details[f"bridge {segment.bridge}"] = f"up, {segment.gateway}"
            ok_details[f"routing rule {segment.bridge}"] = \
                f"pref {rule_pref(segment.index)}: unchecked packets from VMs are not routed"
        ok_details["routing rule local"] = "the local table is looked up after browservm's rules"
        pieces = list(dict.fromkeys(prop.piece for prop in expectation.host))
        if self.netns.name is not None and f"netns {self.netns.name}" not in pieces:
            pieces.insert(0, f"netns {self.netns.name}")
        checks += [Check(f"read {what}", False, what) for what in snapshot.errors]
        with self._inside() as links:
            for piece in pieces:
                wrong = props.get(piece, [])
                checks.append(Check(piece, not wrong, "; ".join(m.text for m in wrong) if wrong
                                    else ok_details.get(piece, "as set")))
                bridge = next((s for s in self.plan.segments if piece == f"bridge {s.bridge}"), None)
                if bridge is not None:
                    checks += self._check_foreign_ports(links, bridge)
            checks.append(self._check_firewall(links, snapshot))
            events = self.drift_events()
            if events:
                when, what = events[-1]
                checks.append(Check("nftables drift", True, f"restored {len(events)} time(s), last at "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}: {what}"))
            if self.plan.uplink is not None:
                uplink = links.get(self.plan.uplink)
                checks.append(Check(f"uplink {self.plan.uplink}", uplink is not None and uplink.up,
                                    "missing" if uplink is None else ("up" if uplink.up else "down")))
            checks += self._check_taps(links, expectation, snapshot)
        return checks

    def _check_foreign_ports(self, links: Links, segment: Segment) -> list[Check]:
        """A port on our bridge that is not a VM's TAP: its frames reach no VM and not the host."""
        bridge = links.get(segment.bridge)
        if bridge is None:
            return []
        mine = {link.name for link in self._our_taps(links, self._leases())}
        return [Check(f"port {link.name}", False, f"on {segment.bridge} but not a VM's TAP (kind "
                      f"{link.kind or 'plain'}, alias {link.alias!r}): its frames are dropped; remove it")
                for link in links.all() if link.master == bridge.index and link.name not in mine]

    def _check_firewall(self, links: Links, snapshot: Snapshot | None = None) -> Check:
        """Our tables against what `host up` installed; judged from `snapshot`, each difference is named."""
        piece = FIREWALL
        if snapshot is not None and snapshot.ruleset is not None:
            current = ours(snapshot.ruleset) or None
        else:
            current = self._nft.list_table()
        if current is None:
            return Check(piece, False, "missing")
        recorded = self._records.get("nft", "inet browservm")
        if recorded is None:
            return Check(piece, False, "present but not installed by this state directory")
        record = json.loads(recorded)
        if record["listing"] is None:
            return Check(piece, False, "its installation was interrupted; run `host up`")
        if record["digest"] != ruleset_digest(self._desired_firewall()):
            return Check(piece, False, "installed for another configuration; run `host up`")
        if record["listing"] != normalise_listing(current):
            named = ruleset_mismatches(record["listing"], current) if snapshot is not None else []
            return Check(piece, False, "changed since browservm installed it; run `host up`"
                         + "".join(f"; {m.text}" for m in named))
        missing = self._missing_elements(current, self._vm_ports(links))
        if missing:
            return Check(piece, False, f"lacks the addresses of VM ports {', '.join(sorted(missing))}: "
                         "their frames are dropped; run `host up`")
        return Check(piece, True, f"as installed ({record['digest']})")

    def _check_taps(self, links: Links, expectation: Expectation, snapshot: Snapshot) -> list[Check]:
        leases = {lease.vm_id: lease for lease in self._leases()}
        checks = []
        ours = self._our_taps(links, list(leases.values()))
        healthy = 0
        for link, vm_id in ours.items():
            lease = leases.get(vm_id)
            if link.half_made_tap:
                checks.append(Check(f"tap {link.name}", False, f"VM {vm_id}'s, half made: created but never "
                                    "attached (its start was interrupted); `vm rm` removes it"))
                continue
            problems = []
            if lease is None:
                problems.append(f"orphan: VM {vm_id} holds no lease")
            elif link.name != lease.tap:
                problems.append(f"VM {vm_id} should have TAP {lease.tap}")
            else:
                props = expectation.port(vm_id, lease.tap, lease.bridge, lease.mac, lease.address.ip)
                problems += [m.text for m in compare(props, snapshot)]
            if problems:
                checks.append(Check(f"tap {link.name}", False, "; ".join(problems)))
            else:
                healthy += 1
        with_tap = set(ours.values())
        for vm_id, lease in leases.items():
            if vm_id in with_tap:
                continue
            if lease.tap in snapshot.links:  # there, but its label no longer says whose: name what differs
                props = expectation.port(vm_id, lease.tap, lease.bridge, lease.mac, lease.address.ip)
                checks.append(Check(f"tap {lease.tap}", False, "; ".join(m.text for m in compare(props, snapshot))))
            else:
                checks.append(Check(f"lease {lease.address.ip}", False, f"VM {vm_id} has no TAP {lease.tap}"))
        checks.append(Check("taps", True, f"{healthy} attached and up, {len(leases)} leases of "
                                          f"{self.plan.capacity} addresses"))
        return checks

    def _leases(self) -> list[Lease]:
        return Ipam(self._store, self.plan).leases()

    def _our_taps(self, links: Links, leases: list[Lease]) -> dict[LinkInfo, str]:
        """TAP -> VM id for the TAPs this controller made: labelled ones, and half-made ones of leased VMs.

        A half-made TAP carries no label, but its name is derived from a VM id in
        our own lease table, which makes it ours.
        """
        every = links.all()
        ours = {link: vm_id for link in every if (vm_id := link.vm_of(self.owner)) is not None}
        by_name = {link.name: link for link in every}
        for lease in leases:
            link = by_name.get(lease.tap)
            if link is not None and link.half_made_tap:
                ours[link] = lease.vm_id
        return ours

    @_confined
    def down(self, force: bool = False) -> list[Change]:
        if not self.netns.exists():
            # The namespace is gone, and with it everything browservm made inside it.
            changes = self._release_vms(None, force)
            changes.append(Change(f"netns {self.netns.name}", "unchanged", "not present"))
            for kind in ("nft", "rule", "drift", "address", "bridge", "sysctl", "netns"):
                for name in self._records.names(kind):
                    self._records.remove(kind, name)
        else:
            with self._inside() as links:
                changes = self._release_vms(links, force) + self._remove_recorded(links)
            self._close_links()
            for name in self._records.names("netns"):
                namespace = NetworkNamespace(name)
                present = namespace.exists()
                namespace.delete()
                self._records.remove("netns", name)
                changes.append(Change(f"netns {name}", *_removed(present)))
        self._store.unclaim("netns")  # nothing of ours is left: the state directory is free again
        return changes

    def _release_vms(self, links: Links | None, force: bool) -> list[Change]:
        """Refuse while VMs hold leases or TAPs; with `force`, delete their TAPs and release their leases."""
        leases = self._leases()
        taps = self._our_taps(links, leases) if links is not None else {}
        if (leases or taps) and not force:
            names = ", ".join(sorted({lease.vm_id for lease in leases} | set(taps.values())))
            raise HostNetworkError("host down", f"VMs still have leases or TAPs ({names}); "
                                   "destroy them first, or pass --force", netns=self.netns.name)
        changes = []
        for tap, vm_id in taps.items():
            assert links is not None
            links.delete(tap.index, tap.name)
            changes.append(Change(f"tap {tap.name}", "removed", f"VM {vm_id}"))
        if leases:
            ipam = Ipam(self._store, self.plan)
            for lease in leases:
                ipam.release(lease.vm_id)
            changes.append(Change("leases", "removed", f"{len(leases)} released"))
        return changes

    def _remove_recorded(self, links: Links) -> list[Change]:
        """Remove what `up` recorded as created by it, newest kind first."""
        changes = []
        if self._records.get("nft", "inet browservm") is not None:
            removed = self._nft.delete_table()
            self._records.remove("nft", "inet browservm")
            changes.append(Change(FIREWALL, "removed" if removed else "unchanged"))
        for name in self._records.names("rule"):
            bridge_name, _, pref = name.partition(" ")
            present = self._rules.delete(bridge_name, int(pref))
            self._records.remove("rule", name)
            changes.append(Change(f"routing rule {bridge_name}", *_removed(present)))
        for name in self._records.names("drift"):
            self._records.remove("drift", name)
        # A record may name an object that never got created (`up` records before it creates).
        for name in self._records.names("address"):
            bridge_name, _, address = name.partition(" ")
            bridge = links.get(bridge_name)
            present = bridge is not None and IPv4Interface(address) in links.addresses(bridge)
            if present and bridge is not None:
                links.remove_address(bridge, IPv4Interface(address))
            self._records.remove("address", name)
            changes.append(Change(f"address {address} on {bridge_name}", *_removed(present)))
        for name in self._records.names("bridge"):
            bridge = links.get(name)
            if bridge is not None:
                links.delete(bridge.index, bridge.name)
            self._records.remove("bridge", name)
            changes.append(Change(f"bridge {name}", *_removed(bridge is not None)))
        previous = self._records.get("sysctl", IP_FORWARD)
        if previous is not None:
            self._sysctl.write(IP_FORWARD, previous)
            self._records.remove("sysctl", IP_FORWARD)
            changes.append(Change(f"sysctl {IP_FORWARD}", "updated", f"restored {previous}"))
        return changes

    # --- one TAP per VM ------------------------------------------------------------

    def add_tap(self, lease: Lease) -> None:
        """Create the VM's TAP, owned by the VMM user, as an up, isolated and checked port of its bridge.

        In the calling thread, without pyroute2 or an nft process: this is on every VM's start-up path.
        """
        with self.netns.entered():
            index = create_tap(lease.tap, *self._tap_owner, netns=self.netns.name)
            # A crash here leaves a TAP without its alias; `remove_tap` and `owned_taps` know it by its name.
            crash_point("net.tap.created")
            self._attach(lease, index)

    def set_tap_up(self, tap: str, up: bool) -> None:
        """Bring the VM's TAP up or down (a restored Firecracker VM's link is held down this way until it
        has taken its own identity: Firecracker has no link control of its own)."""
        with self.netns.entered():
            rtnl = RtnlSocket()
            try:
                rtnl.set_up(socket.if_nametoindex(tap), up)
            except OSError as exc:
                raise HostNetworkError("set TAP up" if up else "set TAP down", exc.strerror or str(exc), device=tap,
                                       netns=self.netns.name) from exc
            finally:
                rtnl.close()

    def attach_link(self, lease: Lease) -> None:
        """Make the existing link named `lease.tap` the VM's port, as `add_tap` does with the TAP it creates.

        For a device made by someone else for the VM (a stand-in guest's veth in
        the tests, a VMM that makes its own TAP). Removed by `remove_tap`.
        """
        with self.netns.entered():
            try:
                index = socket.if_nametoindex(lease.tap)
            except OSError:
                raise HostNetworkError("attach link", "does not exist", device=lease.tap,
                                       netns=self.netns.name) from None
            self._attach(lease, index)

    def _attach(self, lease: Lease, index: int) -> None:
        """Attach the port, then allow its VM's addresses on it.

        The port joins the bridge in VM_PORT_GROUP in the same message, so from
        its first frame it is checked; until its elements are in, nothing matches
        and every frame is dropped. A failure leaves neither port nor elements.
        """
        port = VmPort(lease.tap, lease.mac, lease.address.ip)
        # The values `host status` and the doctor expect on this port: one description (expected.py).
        spec = vm_port(lease.vm_id, lease.tap, lease.bridge, lease.mac, lease.address.ip, controller=self.owner,
                       tap_owner=self._tap_owner)
        assert spec.alias is not None
        rtnl = RtnlSocket()
        try:
            with self._port_lock:
                attach_port(rtnl, index, spec.tap, spec.bridge, spec.alias, netns=self.netns.name, group=spec.group,
                            mac=spec.mac, address=spec.address)
                self._ports.add(port)
        except BaseException:
            with contextlib.suppress(HostNetworkError):  # the first error is the one to report
                self._forget_neighbour(rtnl, lease.bridge, lease.address.ip)
            rtnl.delete_link(index)
            raise
        finally:
            rtnl.close()

    def _forget_neighbour(self, rtnl: RtnlSocket, bridge: str, address: IPv4Address) -> None:
        try:
            rtnl.forget_neighbour(socket.if_nametoindex(bridge), address.packed)
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # no bridge, no neighbour entry
                raise HostNetworkError("forget neighbour", exc.strerror or str(exc), device=bridge,
                                       netns=self.netns.name) from exc

    @_confined
    def remove_tap(self, vm_id: str) -> bool:
        """Delete the VM's TAP, its set elements and its pinned neighbour entry; False if the TAP was gone.

        Never deletes a TAP another VM owns. A TAP with the VM's name and no
        alias at all is the VM's own, half made by an interrupted `add_tap`: the
        caller names a VM of its own store, and only that VM's id derives this name.
        """
        names = names_for(vm_id)
        tap = names.tap
        with self._inside() as links:
            link = links.get(tap)
            if link is not None and link.vm_of(self.owner) != vm_id and not link.half_made_tap:
                raise HostNetworkError("delete TAP", f"belongs to {link.alias or 'someone else'}, not VM {vm_id}",
                                       device=tap, netns=self.netns.name)
            with self._port_lock:
                if link is not None:
                    links.delete(link.index, link.name)  # the port first: it never carries unchecked frames
                listing = self._nft.list_table() if link is None else None
                lease = Ipam(self._store, self.plan).get(vm_id)
                address = lease.address.ip if lease is not None else None
                if address is None:
                    # The lease went first (an interrupted release): the sets still know the address.
                    listing = listing if listing is not None else self._nft.list_table()
                    held = listed_ports(listing or []).get(tap, (None, None))[1]
                    address = IPv4Address(held) if held is not None else None
                if address is not None:
                    self._ports.remove(VmPort(tap, names.mac, address))
                    rtnl = RtnlSocket()
                    try:
                        for segment in self.plan.segments:
                            if address in segment.network:
                                self._forget_neighbour(rtnl, segment.bridge, address)
                    finally:
                        rtnl.close()
            return link is not None

    @_confined
    def owned_taps(self) -> dict[str, str]:
        """TAP name -> VM id, for every TAP that this controller made, half-made ones of leased VMs included."""
        with self._inside() as links:
            return {link.name: vm_id for link, vm_id in self._our_taps(links, self._leases()).items()}


def _by_piece(mismatches: list[Mismatch]) -> dict[str, list[Mismatch]]:
    grouped: dict[str, list[Mismatch]] = {}
    for mismatch in mismatches:
        grouped.setdefault(mismatch.prop.piece, []).append(mismatch)
    return grouped


def _removed(present: bool) -> tuple[str, str]:
    """How `down` reports a recorded object: removed, or never created (an interrupted `up`)."""
    return ("removed", "") if present else ("unchanged", "not present")
