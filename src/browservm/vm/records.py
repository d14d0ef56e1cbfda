"""VM records in the store: what each VM is, where its parts are, how far it got and why it failed."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from typing import Any

from browservm.errors import LimitExceeded
from browservm.store import Store
from browservm.vm.state import VmState


@dataclass(frozen=True)
class Failure:
    hop: str
    reason: str
    hint: str
    evidence: tuple[str, ...] = ()  # the last console lines, the probe's output


@dataclass
class VmRecord:
    vm_id: str
    user: str
    vcpus: int
    mem_mib: int
    directory: str
    state: VmState = VmState.CREATING
    created_at: float = field(default_factory=time.time)
    driver: str = ""
    accel: str = ""
    pid: int | None = None
    pid_start_time: int | None = None
    address: str = ""
    gateway: str = ""
    tap: str = ""
    mac: str = ""
    bridge: str = ""
    guest_network_by: str = ""  # "kernel" (IP_PNP applied ip=) or "configurator" (browservm-net did)
    stages: dict[str, float] = field(default_factory=dict)  # seconds after created_at each stage finished
    failure: Failure | None = None
    failed_at: float | None = None
    holds_resources: bool = True  # False once a failed VM's TAP, lease, disk and VMM are released

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmRecord:
        data = dict(data)
        data["state"] = VmState(data["state"])
        if data.get("failure") is not None:
            failure = data["failure"]
            data["failure"] = Failure(failure["hop"], failure["reason"], failure["hint"],
                                      tuple(failure.get("evidence", ())))
        return cls(**data)


class VmRecords:
    def __init__(self, store: Store) -> None:
        self._store = store

    def insert(self, record: VmRecord, *, max_total: int, max_per_user: int) -> None:
        """Add a new VM unless that would exceed a limit; counted and written in one transaction."""
        with self._store.transaction() as db:
            total = db.execute("SELECT count(*) FROM vms WHERE holds_resources").fetchone()[0]
            if total >= max_total:
                raise LimitExceeded("max_vms", max_total, f"this host already runs {total} VMs")
            mine = db.execute("SELECT count(*) FROM vms WHERE holds_resources AND user = ?",
                              (record.user,)).fetchone()[0]
            if mine >= max_per_user:
                raise LimitExceeded("max_vms_per_user", max_per_user, f"user {record.user!r} already has {mine} VMs")
            db.execute("INSERT INTO vms (vm_id, user, state, holds_resources, data) VALUES (?, ?, ?, ?, ?)",
                       (record.vm_id, record.user, record.state.value, record.holds_resources,
                        json.dumps(record.to_json())))

    def save(self, record: VmRecord) -> None:
        with self._store.transaction() as db:
            db.execute("UPDATE vms SET state = ?, holds_resources = ?, data = ? WHERE vm_id = ?",
                       (record.state.value, record.holds_resources, json.dumps(record.to_json()), record.vm_id))

    def get(self, vm_id: str) -> VmRecord | None:
        rows = self._store.read("SELECT data FROM vms WHERE vm_id = ?", (vm_id,))
        return VmRecord.from_json(json.loads(str(rows[0][0]))) if rows else None

    def all(self) -> list[VmRecord]:
        rows = self._store.read("SELECT data FROM vms ORDER BY rowid")
        return [VmRecord.from_json(json.loads(str(row[0]))) for row in rows]

    def delete(self, vm_id: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM vms WHERE vm_id = ?", (vm_id,))
