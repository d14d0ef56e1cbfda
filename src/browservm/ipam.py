"""Address leases for VMs, kept in the store.

Allocation is next-fit: the search starts after the last address handed out
and wraps around. A just-released address is therefore the last to be reused,
so a neighbour cache still holding the old VM's MAC has time to expire, and
the common case costs one indexed lookup whatever the number of leases.

The lease row also holds the VM's TAP name and MAC under UNIQUE constraints:
this is where a hash collision between two VM ids would be caught.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface

from browservm.egress import EgressPolicy
from browservm.errors import NameCollision, PoolExhausted, StateError
from browservm.ids import VmNames, names_for
from browservm.netplan import NetworkPlan
from browservm.store import Store

_CURSOR_KEY = "ipam.cursor"
_BATCH = 256


@dataclass(frozen=True)
class Lease:
    vm_id: str
    address: IPv4Interface  # with the segment's prefix, as the guest configures it
    gateway: IPv4Address
    bridge: str
    tap: str
    mac: str
    egress: EgressPolicy | None = None  # the VM's own egress policy; None: the host's


class Ipam:
    def __init__(self, store: Store, plan: NetworkPlan) -> None:
        self._store = store
        self._plan = plan

    def lease(self, vm_id: str, egress: EgressPolicy | None = None) -> Lease:
        """The VM's lease, made now with `egress` (its template's policy) if it has none (calling twice
        returns the same lease, with the policy it was made with)."""
        names = names_for(vm_id)
        with self._store.transaction() as db:
            row = db.execute("SELECT address, egress FROM leases WHERE vm_id = ?", (vm_id,)).fetchone()
            if row is not None:
                return self._lease_from_row(vm_id, row[0], row[1], names)
            address = self._find_free(db)
            policy = None if egress is None else egress.to_json()
            try:
                db.execute(
                    "INSERT INTO leases (vm_id, address, tap, mac, leased_at, egress) VALUES (?, ?, ?, ?, ?, ?)",
                    (vm_id, address, names.tap, names.mac, time.time(), policy),
                )
            except sqlite3.IntegrityError:
                raise self._collision(db, vm_id, names.tap, names.mac) from None
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (_CURSOR_KEY, str(address)))
            return self._lease_from_row(vm_id, address, policy, names)

    def release(self, vm_id: str) -> Lease | None:
        """Give the VM's address back; returns the lease, or None when it held none."""
        with self._store.transaction() as db:
            row = db.execute("DELETE FROM leases WHERE vm_id = ? RETURNING address, egress", (vm_id,)).fetchone()
        return None if row is None else self._lease_from_row(vm_id, row[0], row[1])

    def get(self, vm_id: str) -> Lease | None:
        rows = self._store.read("SELECT address, egress FROM leases WHERE vm_id = ?", (vm_id,))
        return self._lease_from_row(vm_id, rows[0][0], rows[0][1]) if rows else None

    def leases(self) -> list[Lease]:
        rows = self._store.read("SELECT vm_id, address, egress FROM leases ORDER BY address")
        return [self._lease_from_row(str(vm_id), addr, egress) for vm_id, addr, egress in rows]

    def _find_free(self, db: sqlite3.Connection) -> int:
        plan = self._plan
        first = int(plan.subnet.network_address)
        end = int(plan.subnet.broadcast_address) + 1
        row = db.execute("SELECT value FROM meta WHERE key = ?", (_CURSOR_KEY,)).fetchone()
        start = int(row[0]) + 1 if row is not None else first
        if not first <= start < end:
            start = first
        # Walk [start, end) then [first, start) in batches, skipping leased
        # and reserved (network, gateway, broadcast) addresses.
        for low, high in ((start, end), (first, start)):
            batch_low = low
            while batch_low < high:
                batch_high = min(batch_low + _BATCH, high)
                taken = {a for (a,) in db.execute(
                    "SELECT address FROM leases WHERE address >= ? AND address < ?", (batch_low, batch_high))}
                for candidate in range(batch_low, batch_high):
                    if candidate not in taken and plan.is_vm_address(candidate):
                        return candidate
                batch_low = batch_high
        leased = db.execute("SELECT count(*) FROM leases").fetchone()[0]
        raise PoolExhausted(str(plan.subnet), leased)

    def _collision(self, db: sqlite3.Connection, vm_id: str, tap: str, mac: str) -> NameCollision:
        row = db.execute("SELECT vm_id FROM leases WHERE tap = ?", (tap,)).fetchone()
        if row is not None:
            return NameCollision(vm_id, "TAP name", tap, row[0])
        row = db.execute("SELECT vm_id FROM leases WHERE mac = ?", (mac,)).fetchone()
        if row is not None:
            return NameCollision(vm_id, "MAC", mac, row[0])
        return NameCollision(vm_id, "address", "?", "?")

    def _lease_from_row(self, vm_id: str, address: object, egress: object,
                        names: VmNames | None = None) -> Lease:
        assert isinstance(address, int) and (egress is None or isinstance(egress, str))
        segment = self._plan.segment_of(IPv4Address(address))
        if segment is None:
            raise StateError(str(self._store.path), f"VM {vm_id!r} holds {IPv4Address(address)}, outside "
                             f"the configured subnet {self._plan.subnet}; destroy it or restore the subnet")
        names = names or names_for(vm_id)
        return Lease(
            vm_id=vm_id,
            address=IPv4Interface((address, segment.network.prefixlen)),
            gateway=segment.gateway.ip,
            bridge=segment.bridge,
            tap=names.tap,
            mac=names.mac,
            egress=None if egress is None else EgressPolicy.from_json(egress),
        )
