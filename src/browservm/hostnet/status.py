"""`host status`: every piece `host up` set and every VM's port, as found now, against what was set
(expected.py, from one snapshot: observed.py), each difference named."""

from __future__ import annotations

import time

from browservm.hostnet.drift import Drift
from browservm.hostnet.expected import Expectation, Mismatch, compare, host_props
from browservm.hostnet.installed import InstalledFirewall
from browservm.hostnet.links import Links
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.observed import Snapshot, read_snapshot
from browservm.hostnet.pieces import Check
from browservm.hostnet.recorded import HostRecords
from browservm.hostnet.rules import rule_pref
from browservm.hostnet.sysctl import IP_FORWARD
from browservm.hostnet.taps import VmTaps
from browservm.hostnet.worker import NetlinkThread
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan, Segment


class HostStatus:
    def __init__(self, plan: NetworkPlan, ipam: Ipam, netns: NetworkNamespace, thread: NetlinkThread, *,
                 records: HostRecords, firewall: InstalledFirewall, taps: VmTaps, drift: Drift, owner: str,
                 tap_owner: tuple[int, int]) -> None:
        self._plan = plan
        self._ipam = ipam
        self._netns = netns
        self._thread = thread
        self._records = records
        self._firewall = firewall
        self._taps = taps
        self._drift = drift
        self._owner = owner
        self._tap_owner = tap_owner

    def expected(self) -> Expectation:
        """What this state directory's `host up` and `add_tap` set, for `status` and the doctor to compare."""
        listing = self._firewall.listing()
        props = host_props(self._plan, netns=self._netns.name, own_netns=bool(self._records.names("netns")),
                           made_bridges=self._records.names("bridge"))
        return Expectation(tuple(props), listing, self._owner, self._tap_owner, self._netns.name)

    def status(self) -> list[Check]:
        """Every piece `host up` and the VMs' ports set, as found now. On the netlink thread."""
        checks: list[Check] = []
        if self._netns.name is not None and not self._netns.exists():
            return [Check(f"netns {self._netns.name}", False, "missing")]
        snapshot = read_snapshot(self._netns)
        expectation = self.expected()
        props = _by_piece(compare(expectation.host, snapshot))
        ok_details = {f"netns {self._netns.name}": "present", f"sysctl {IP_FORWARD}": "1"}
        for segment in self._plan.segments:
            ok_details[f"bridge {segment.bridge}"] = f"up, {segment.gateway}"
            ok_details[f"routing rule {segment.bridge}"] = \
                f"pref {rule_pref(segment.index)}: unchecked packets from VMs are not routed"
        ok_details["routing rule local"] = "the local table is looked up after browservm's rules"
        pieces = list(dict.fromkeys(prop.piece for prop in expectation.host))
        if self._netns.name is not None and f"netns {self._netns.name}" not in pieces:
            pieces.insert(0, f"netns {self._netns.name}")
        checks += [Check(f"read {what}", False, what) for what in snapshot.errors]
        with self._thread.inside() as links:
            for piece in pieces:
                wrong = props.get(piece, [])
                checks.append(Check(piece, not wrong, "; ".join(m.text for m in wrong) if wrong
                                    else ok_details.get(piece, "as set")))
                bridge = next((s for s in self._plan.segments if piece == f"bridge {s.bridge}"), None)
                if bridge is not None:
                    checks += self._check_foreign_ports(links, bridge)
            checks.append(self._firewall.check(links, snapshot))
            events = self._drift.events()
            if events:
                when, what = events[-1]
                checks.append(Check("nftables drift", True, f"restored {len(events)} time(s), last at "
                                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(when))}: {what}"))
            if self._plan.uplink is not None:
                uplink = links.get(self._plan.uplink)
                checks.append(Check(f"uplink {self._plan.uplink}", uplink is not None and uplink.up,
                                    "missing" if uplink is None else ("up" if uplink.up else "down")))
            checks += self._check_taps(links, expectation, snapshot)
        return checks

    def _check_foreign_ports(self, links: Links, segment: Segment) -> list[Check]:
        """A port on our bridge that is not a VM's TAP: its frames reach no VM and not the host."""
        bridge = links.get(segment.bridge)
        if bridge is None:
            return []
        mine = {link.name for link in self._taps.ours(links, self._ipam.leases())}
        return [Check(f"port {link.name}", False, f"on {segment.bridge} but not a VM's TAP (kind "
                      f"{link.kind or 'plain'}, alias {link.alias!r}): its frames are dropped; remove it")
                for link in links.all() if link.master == bridge.index and link.name not in mine]

    def _check_taps(self, links: Links, expectation: Expectation, snapshot: Snapshot) -> list[Check]:
        leases = {lease.vm_id: lease for lease in self._ipam.leases()}
        checks = []
        ours = self._taps.ours(links, list(leases.values()))
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
                                          f"{self._plan.capacity} addresses"))
        return checks


def _by_piece(mismatches: list[Mismatch]) -> dict[str, list[Mismatch]]:
    grouped: dict[str, list[Mismatch]] = {}
    for mismatch in mismatches:
        grouped.setdefault(mismatch.prop.piece, []).append(mismatch)
    return grouped
