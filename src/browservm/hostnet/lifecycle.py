"""The host network's lifecycle: `host up` makes what the plan needs, `host down` removes it.

`up()` makes what the plan needs and records in the store what *it* creates
(recorded.py); `down()` removes exactly those records' objects, so a bridge,
address or namespace that was there before browservm is left alone. Both are
idempotent: a second `up()` reports every piece unchanged and changes nothing.
Both run on the netlink thread (worker.py).
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Interface

from browservm.errors import HostNetworkError
from browservm.faults import crash_point
from browservm.hostnet.installed import InstalledFirewall
from browservm.hostnet.links import BRIDGE_ALIAS, LinkInfo, Links
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.pieces import Change, removed
from browservm.hostnet.portlock import PortLock
from browservm.hostnet.recorded import HostRecords
from browservm.hostnet.rules import PolicyRules, rule_pref
from browservm.hostnet.sysctl import IP_FORWARD, Sysctl
from browservm.hostnet.taps import VmTaps
from browservm.hostnet.worker import NetlinkThread
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan, Segment
from browservm.store import Store

_log = logging.getLogger("browservm.hostnet")


class HostLifecycle:
    def __init__(self, plan: NetworkPlan, store: Store, netns: NetworkNamespace, thread: NetlinkThread, *,
                 records: HostRecords, firewall: InstalledFirewall, taps: VmTaps, port_lock: PortLock,
                 sysctl: Sysctl, adopt_bridge: bool) -> None:
        self._plan = plan
        self._store = store
        self._ipam = Ipam(store, plan)
        self._netns = netns
        self._thread = thread
        self._records = records
        self._firewall = firewall
        self._taps = taps
        self._port_lock = port_lock
        self._sysctl = sysctl
        self._rules = PolicyRules(netns.name)
        self._adopt_bridge = adopt_bridge

    def up(self) -> list[Change]:
        """Make what the plan needs, recording each object before it creates it; what it did to each piece."""
        changes: list[Change] = []
        if self._netns.name is not None:
            changes.append(self._up_netns(self._netns.name))
        with self._thread.inside() as links:
            if self._records.names("netns"):
                # A namespace starts with loopback down; tools run inside it (ip netns exec) expect it up.
                lo = links.get("lo")
                if lo is not None and not lo.up:
                    links.set_up(lo)
            changes.append(self._up_forwarding())
            self._check_no_overlap(links)
            for segment in self._plan.segments:
                changes += self._up_bridge(links, segment)
            changes += [self.rule(segment) for segment in self._plan.segments]
            with self._port_lock:
                changes.append(self._firewall.install(links))
        return changes

    def _up_netns(self, name: str) -> Change:
        piece = f"netns {name}"
        if self._netns.exists():
            return Change(piece, "unchanged")
        # Not through `intent`: a failed creation can leave the mount point file behind, which is ours.
        recorded = self._records.get("netns", name) is not None
        self._records.add("netns", name)
        if not self._netns.create():
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
        ours = set(self._plan.bridges)
        names = {}
        for link in links.all():
            names[link.index] = link.name
            if link.name in ours:
                continue
            for address in links.addresses(link):
                if address.network.overlaps(self._plan.subnet):
                    raise HostNetworkError(
                        "check subnet", f"{address} on {link.name} overlaps the VM subnet {self._plan.subnet}; "
                        "configure another subnet", device=link.name, netns=self._netns.name)
        for destination, oif in links.routes():
            device = names.get(oif) if oif is not None else None
            if device not in ours and destination.overlaps(self._plan.subnet):
                raise HostNetworkError(
                    "check subnet", f"a route to {destination}{f' via {device}' if device else ''} overlaps the VM "
                    f"subnet {self._plan.subnet}; configure another subnet", device=device, netns=self._netns.name)

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
                                   device=segment.bridge, netns=self._netns.name)
        elif (foreign := self._not_ours(links, bridge)) is not None:
            if not self._adopt_bridge:
                raise HostNetworkError(
                    "check bridge", f"exists and was not created by browservm ({foreign}); it may be this "
                    "host's LAN bridge: configure another --bridge, or pass --adopt-bridge to use it anyway",
                    device=segment.bridge, netns=self._netns.name)
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

    def rule(self, segment: Segment) -> Change:
        """The segment's routing rule, and local delivery after it in a namespace of our own (drift.py
        puts them back with this too)."""
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

    def down(self, force: bool = False) -> list[Change]:
        """Remove what `up` recorded, and with `force` the VMs' TAPs and leases; what it did to each piece."""
        if not self._netns.exists():
            # The namespace is gone, and with it everything browservm made inside it.
            changes = self._release_vms(None, force)
            changes.append(Change(f"netns {self._netns.name}", "unchanged", "not present"))
            for kind in ("nft", "rule", "drift", "address", "bridge", "sysctl", "netns"):
                for name in self._records.names(kind):
                    self._records.remove(kind, name)
        else:
            with self._thread.inside() as links:
                changes = self._release_vms(links, force) + self._remove_recorded(links)
            self._thread.close_links()
            for name in self._records.names("netns"):
                namespace = NetworkNamespace(name)
                present = namespace.exists()
                namespace.delete()
                self._records.remove("netns", name)
                changes.append(Change(f"netns {name}", *removed(present)))
        self._store.unclaim("netns")  # nothing of ours is left: the state directory is free again
        return changes

    def _release_vms(self, links: Links | None, force: bool) -> list[Change]:
        """Refuse while VMs hold leases or TAPs; with `force`, delete their TAPs and release their leases."""
        leases = self._ipam.leases()
        taps = self._taps.ours(links, leases) if links is not None else {}
        if (leases or taps) and not force:
            names = ", ".join(sorted({lease.vm_id for lease in leases} | set(taps.values())))
            raise HostNetworkError("host down", f"VMs still have leases or TAPs ({names}); "
                                   "destroy them first, or pass --force", netns=self._netns.name)
        changes = []
        for tap, vm_id in taps.items():
            assert links is not None
            links.delete(tap.index, tap.name)
            changes.append(Change(f"tap {tap.name}", "removed", f"VM {vm_id}"))
        if leases:
            for lease in leases:
                self._ipam.release(lease.vm_id)
            changes.append(Change("leases", "removed", f"{len(leases)} released"))
        return changes

    def _remove_recorded(self, links: Links) -> list[Change]:
        """Remove what `up` recorded as created by it, newest kind first."""
        changes = []
        firewall = self._firewall.remove()
        if firewall is not None:
            changes.append(firewall)
        for name in self._records.names("rule"):
            bridge_name, _, pref = name.partition(" ")
            present = self._rules.delete(bridge_name, int(pref))
            self._records.remove("rule", name)
            changes.append(Change(f"routing rule {bridge_name}", *removed(present)))
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
            changes.append(Change(f"address {address} on {bridge_name}", *removed(present)))
        for name in self._records.names("bridge"):
            bridge = links.get(name)
            if bridge is not None:
                links.delete(bridge.index, bridge.name)
            self._records.remove("bridge", name)
            changes.append(Change(f"bridge {name}", *removed(bridge is not None)))
        previous = self._records.get("sysctl", IP_FORWARD)
        if previous is not None:
            self._sysctl.write(IP_FORWARD, previous)
            self._records.remove("sysctl", IP_FORWARD)
            changes.append(Change(f"sysctl {IP_FORWARD}", "updated", f"restored {previous}"))
        return changes
