"""browservm's nftables tables as `host up` installs them, records them in the store, and checks them.

The record holds the rendered rules' digest and nft's own listing of what was installed, so a
table changed by hand, or installed for another configuration, is told apart from ours; the
running VMs' set elements go in with the tables, so a VM's port is never without them.
"""

from __future__ import annotations

import json
import os

from browservm.errors import HostNetworkError
from browservm.faults import crash_point
from browservm.hostnet.expected import FIREWALL, ruleset_mismatches
from browservm.hostnet.firewall import (
    Nftables,
    VmPort,
    listed_egress,
    listed_ports,
    normalise_listing,
    ours,
    render_ruleset,
    ruleset_digest,
    vm_elements,
)
from browservm.hostnet.links import Links
from browservm.hostnet.observed import Snapshot
from browservm.hostnet.pieces import Change, Check
from browservm.hostnet.recorded import HostRecords
from browservm.hostnet.sysctl import IP_FORWARD
from browservm.hostnet.taps import VmTaps
from browservm.netplan import NetworkPlan

_RECORD = ("nft", "inet browservm")  # kind and name of the tables' record


class InstalledFirewall:
    """Install and check under the port lock (portlock.py): the VM ports read here must not change
    before the tables are replaced."""

    def __init__(self, plan: NetworkPlan, netns: str | None, records: HostRecords, nft: Nftables,
                 taps: VmTaps) -> None:
        self._plan = plan
        self._netns = netns
        self._records = records
        self._nft = nft
        self._taps = taps

    def installed(self) -> bool:
        """Whether `host up` recorded installing the tables."""
        return self._records.get(*_RECORD) is not None

    def listing(self) -> list[dict[str, object]] | None:
        """nft's listing of the tables as `host up` installed them; None before (or during) an install."""
        record = self._records.get(*_RECORD)
        listing: list[dict[str, object]] | None = json.loads(record)["listing"] if record is not None else None
        return listing

    def desired(self) -> list[dict[str, object]]:
        # If browservm turned forwarding on, it must not turn this host into a router for anyone else.
        confine = self._records.get("sysctl", IP_FORWARD) is not None
        return render_ruleset(self._plan, confine_forwarding=confine, controller_uid=os.geteuid())

    def install(self, links: Links, piece: str = FIREWALL) -> Change:
        desired = self.desired()
        digest = ruleset_digest(desired)
        recorded = self._records.get(*_RECORD)
        current = self._nft.list_table()
        ports = self._taps.attached(links)
        if recorded is not None and current is not None:
            record = json.loads(recorded)
            if record["digest"] == digest and record["listing"] == normalise_listing(current) \
                    and _missing_elements(current, ports) == []:
                return Change(piece, "unchanged", digest)
        # No listing yet: the table is only known once nft lists it back, after the install.
        with self._records.intent(*_RECORD, json.dumps({"digest": digest, "listing": None})):
            # The running VMs' elements go in the same transaction: their ports are never without them.
            self._nft.replace_table(desired, vm_elements(ports))
        crash_point("host.nft.created")
        installed = self._nft.list_table()
        if installed is None:
            raise HostNetworkError("install nftables table", "nft reported success but the table is missing",
                                   netns=self._netns)
        self._records.add(*_RECORD, json.dumps({"digest": digest, "listing": normalise_listing(installed)}))
        return Change(piece, "created" if current is None else "updated", digest)

    def check(self, links: Links, snapshot: Snapshot | None = None) -> Check:
        """Our tables against what `host up` installed; judged from `snapshot`, each difference is named."""
        piece = FIREWALL
        if snapshot is not None and snapshot.ruleset is not None:
            current = ours(snapshot.ruleset) or None
        else:
            current = self._nft.list_table()
        if current is None:
            return Check(piece, False, "missing")
        recorded = self._records.get(*_RECORD)
        if recorded is None:
            return Check(piece, False, "present but not installed by this state directory")
        record = json.loads(recorded)
        if record["listing"] is None:
            return Check(piece, False, "its installation was interrupted; run `host up`")
        if record["digest"] != ruleset_digest(self.desired()):
            return Check(piece, False, "installed for another configuration; run `host up`")
        if record["listing"] != normalise_listing(current):
            named = ruleset_mismatches(record["listing"], current) if snapshot is not None else []
            return Check(piece, False, "changed since browservm installed it; run `host up`"
                         + "".join(f"; {m.text}" for m in named))
        missing = _missing_elements(current, self._taps.attached(links))
        if missing:
            return Check(piece, False, "; ".join(missing) + "; run `host up`")
        return Check(piece, True, f"as installed ({record['digest']})")

    def remove(self) -> Change | None:
        """Delete the tables if `host up` installed them, and their record; None when it did not."""
        if self._records.get(*_RECORD) is None:
            return None
        removed = self._nft.delete_table()
        self._records.remove(*_RECORD)
        return Change(FIREWALL, "removed" if removed else "unchanged")


def _missing_elements(listing: list[dict[str, object]], ports: list[VmPort]) -> list[str]:
    """What the VM ports' elements lack, a phrase per kind: their addresses, or their template's egress policy."""
    held, egress = listed_ports(listing), listed_egress(listing)
    addresses = sorted(p.tap for p in ports if held.get(p.tap) != (p.mac, str(p.address)))
    policies = sorted(p.tap for p in ports if egress.get(p.tap) != p.egress)
    found = []
    if addresses:
        found.append(f"lacks the addresses of VM ports {', '.join(addresses)}: their frames are dropped")
    if policies:
        found.append(f"the egress policy of VM ports {', '.join(policies)} is not their template's (their lease's)")
    return found
