"""VM records in the store: what each VM is, where its parts are, how far it got and why it failed.

Every write is a compare-and-set. A record carries the `version` it was read at; `save` writes
only if the stored row still has that version, and raises StateConflict otherwise. So two
writers racing on one VM (a create and a destroy, a late `ready` and a VMM-exit watch, a
reconcile in another process) never overwrite each other: the loser learns what won.

`owner` names the process (PID and start time) that is creating, adopting or destroying the
VM. A reconcile leaves alone a VM whose owner is alive: that process is still working on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from browservm.access.quotas import NO_QUOTA, Quota
from browservm.errors import LimitExceeded, ProfileInUse, StateConflict
from browservm.store import Store
from browservm.vm.state import VmState

# Whose VM it is: a user's, the warm pool's or the snapshot maker's (vm/create.py RESERVED_USERS).
Purpose = Literal["user", "pool", "snapshot"]


@dataclass(frozen=True)
class Failure:
    hop: str
    reason: str
    hint: str
    evidence: tuple[str, ...] = ()  # the last console lines, the probe's output
    cleanup: tuple[str, ...] = ()  # resources that could not be released, each with its error
    vmm_log: tuple[str, ...] = ()  # the last lines of the VMM's own log (its stderr), copied before release


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
    accel_reason: str = ""  # why that accelerator (the probe's evidence, a demotion, the setting)
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
    keep: bool = False  # keep a failed VM's resources for diagnosis (--keep-failed)
    owner: str = ""  # "PID:start time" of the process working on it, while it is creating or destroying
    viewer_epoch: str = field(default_factory=lambda: secrets.token_hex(8))  # in every viewer token's signature
    started_from: str = "cold"  # "cold" (booted), "restored" (from a snapshot) or "pooled" (a restored VM kept ready)
    snapshot: str = ""  # the snapshot's key, when restored or pooled
    # In the warm pool, not yet claimed. Set by the pool's own create only (no request can), cleared
    # by the claim: the pool, its per-user limit and the reaper's exemption go by this, never by the
    # user's name.
    in_pool: bool = False
    # How the controller reaches its desktop (vm/desktop_path.py); records from before there was a
    # choice went through websockify.
    desktop_path: str = "websockify"
    ended_reason: str = ""  # why it was stopped on purpose (state ended): reaped for idleness, lifetime, ...
    # The first attempt's failure when the create was retried under TCG after KVM stopped its guest:
    # {"accel", "hop", "reason", "stages", "evidence", "vmm_log"}.
    retried_after: dict[str, Any] | None = None
    tenant: str = ""  # whose (access/principal.py): "" is the operator's own
    labels: dict[str, str] = field(default_factory=dict)  # the client's, given at create (api/models.py bounds them)
    timeout_at: float | None = None  # reaped then: its timeout at create, extended on request (within max_lifetime)
    template: str = "default"  # what it was made from (templates.py); records from before templates: the default
    # "persistent": the user's browser profile is loaded at its start and saved at its end (profiles/);
    # SQLite keeps one live VM per tenant, user and persistent profile (store.py, vms_one_per_profile).
    # "ephemeral": a new, empty one, gone with the VM.
    profile: str = "ephemeral"
    version: int = field(default=0, compare=False)  # of the stored row this was read at

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        del data["version"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int = 0) -> VmRecord:
        data = dict(data)
        data["state"] = VmState(data["state"])
        if data.get("failure") is not None:
            failure = data["failure"]
            data["failure"] = Failure(failure["hop"], failure["reason"], failure["hint"],
                                      tuple(failure.get("evidence", ())), tuple(failure.get("cleanup", ())),
                                      tuple(failure.get("vmm_log", ())))
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known}, version=version)


@dataclass(frozen=True)
class Owner:
    """Whose a user's new VM is besides its user's (its tenant, within that tenant's quota), and what the
    client attached to it: set on its record at its create, or at its claim from the warm pool."""

    tenant: str = ""
    quota: Quota = NO_QUOTA
    labels: dict[str, str] = field(default_factory=dict)
    timeout_s: int | None = None
    profile: str = "ephemeral"  # or PERSISTENT: the user's browser profile (profiles/)

    def apply(self, record: VmRecord, now: float) -> None:
        record.tenant, record.labels, record.profile = self.tenant, dict(self.labels), self.profile
        record.timeout_at = None if self.timeout_s is None else now + self.timeout_s


OPERATORS = Owner()  # the operator's own: no tenant, no quota


@dataclass(frozen=True)
class VmQuery:
    """A page of VMs: those of `tenant`, `user`, in `state`, of `template`, carrying every label in `labels`
    (None: any)."""

    after: int = 0  # the cursor: the sequence number of the last VM of the page before
    limit: int = 100
    tenant: str | None = None
    user: str | None = None
    state: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    template: str | None = None


def _next_seq(db: Any) -> int:
    """The next number of the VMs' one sequence, kept in `meta` (never reused, unlike a rowid)."""
    row = db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'vm_seq' RETURNING value")
    found = row.fetchone()
    if found is None:
        start = db.execute("SELECT coalesce(max(seq), 0) + 1 FROM vms").fetchone()[0]
        db.execute("INSERT INTO meta (key, value) VALUES ('vm_seq', ?)", (str(start),))
        return int(start)
    return int(found[0])


PERSISTENT = "persistent"
# The live VM that has a user's persistent profile (at most one: the index vms_one_per_profile).
PROFILE_HOLDER = ("SELECT vm_id FROM vms WHERE tenant = ? AND user = ? AND json_extract(data, '$.profile') = "
                  "'persistent' AND state IN ('creating', 'booting', 'ready')")


@contextlib.contextmanager
def _one_per_profile(db: sqlite3.Connection, record: VmRecord) -> Iterator[None]:
    """ProfileInUse, naming the VM that has it, when the write would give the profile a second live VM."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if record.profile != PERSISTENT or "vms.tenant, vms.user" not in str(exc):
            raise
        row = db.execute(PROFILE_HOLDER, (record.tenant, record.user)).fetchone()
        raise ProfileInUse(record.tenant, record.user, None if row is None else str(row[0])) from None


class VmRecords:
    """The `vms` table. Blocking (SQLite): async callers run these in a thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def insert(self, record: VmRecord, *, max_total: int, max_per_user: int, quota: Quota = NO_QUOTA) -> None:
        """Add a new VM unless that would exceed a limit or its tenant's quota; counted and written in one
        transaction."""
        with self._store.transaction() as db:
            total = db.execute("SELECT count(*) FROM vms WHERE holds_resources").fetchone()[0]
            if total >= max_total:
                raise LimitExceeded("max_vms", max_total, f"this host already runs {total} VMs")
            self._check_owner(db, record, max_per_user, quota)
            with _one_per_profile(db, record):
                db.execute("INSERT INTO vms (vm_id, user, tenant, state, holds_resources, data, version, seq) "
                           "VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                           (record.vm_id, record.user, record.tenant, record.state.value, record.holds_resources,
                            json.dumps(record.to_json()), _next_seq(db)))
        record.version = 1

    @staticmethod
    def _check_owner(db: Any, record: VmRecord, max_per_user: int, quota: Quota) -> None:
        """LimitExceeded if the VM's user or tenant has as many VMs (or as much memory) as allowed."""
        mine = db.execute("SELECT count(*) FROM vms WHERE holds_resources AND user = ? AND tenant = ?",
                          (record.user, record.tenant)).fetchone()[0]
        if mine >= max_per_user:
            raise LimitExceeded("max_vms_per_user", max_per_user, f"user {record.user!r} already has {mine} VMs")
        if quota == NO_QUOTA:
            return
        vms, mem = db.execute("SELECT count(*), coalesce(sum(json_extract(data, '$.mem_mib')), 0) FROM vms "
                              "WHERE holds_resources AND tenant = ?", (record.tenant,)).fetchone()
        if quota.max_vms is not None and vms >= quota.max_vms:
            raise LimitExceeded("tenant.max_vms", quota.max_vms, f"tenant {record.tenant!r} already has {vms} VMs")
        if quota.max_mem_mib is not None and mem + record.mem_mib > quota.max_mem_mib:
            raise LimitExceeded("tenant.max_mem_mib", quota.max_mem_mib,
                                f"tenant {record.tenant!r} has {mem} MiB in VMs, and this one asks for "
                                f"{record.mem_mib} MiB more")

    def save(self, record: VmRecord) -> None:
        """Write `record` if the stored row is still the version it was read at; else StateConflict."""
        with self._store.transaction() as db:
            updated = db.execute(
                "UPDATE vms SET state = ?, holds_resources = ?, data = ?, version = version + 1 "
                "WHERE vm_id = ? AND version = ?",
                (record.state.value, record.holds_resources, json.dumps(record.to_json()), record.vm_id,
                 record.version)).rowcount
            if updated != 1:
                raise self._conflict(db, record)
        record.version += 1

    def claim(self, record: VmRecord, from_user: str, max_per_user: int, quota: Quota = NO_QUOTA) -> bool:
        """Give `record` (changed to its new user and tenant, out of the pool) to that user if it is still
        the pool's, belonging to `from_user` at the version it was read, and the user and tenant are under
        their limits; False if someone else took it."""
        with self._store.transaction() as db:
            row = db.execute("SELECT data FROM vms WHERE vm_id = ? AND version = ? AND user = ?",
                             (record.vm_id, record.version, from_user)).fetchone()
            if row is None or not json.loads(str(row[0])).get("in_pool"):
                return False
            self._check_owner(db, record, max_per_user, quota)
            # A new place in listings: to its new owner's pages it is a VM that has just appeared.
            with _one_per_profile(db, record):
                updated = db.execute(
                    "UPDATE vms SET user = ?, tenant = ?, data = ?, version = version + 1, seq = ? "
                    "WHERE vm_id = ? AND version = ? AND user = ?",
                    (record.user, record.tenant, json.dumps(record.to_json()), _next_seq(db), record.vm_id,
                     record.version, from_user)).rowcount
        if updated != 1:
            return False
        record.version += 1
        return True

    def delete(self, record: VmRecord) -> None:
        """Remove the record if it is still the version it was read at; else StateConflict."""
        with self._store.transaction() as db:
            deleted = db.execute("DELETE FROM vms WHERE vm_id = ? AND version = ?",
                                 (record.vm_id, record.version)).rowcount
            if deleted != 1:
                raise self._conflict(db, record)

    @staticmethod
    def _conflict(db: Any, record: VmRecord) -> StateConflict:
        row = db.execute("SELECT state FROM vms WHERE vm_id = ?", (record.vm_id,)).fetchone()
        return StateConflict(record.vm_id, record.state.value, None if row is None else str(row[0]))

    def get(self, vm_id: str) -> VmRecord | None:
        rows = self._store.read("SELECT data, version FROM vms WHERE vm_id = ?", (vm_id,))
        return VmRecord.from_json(json.loads(str(rows[0][0])), int(str(rows[0][1]))) if rows else None

    def all(self) -> list[VmRecord]:
        rows = self._store.read("SELECT data, version FROM vms ORDER BY seq")
        return [VmRecord.from_json(json.loads(str(data)), int(str(version))) for data, version in rows]

    def page(self, query: VmQuery) -> tuple[list[VmRecord], int | None]:
        """The VMs `query` selects, in the order they appeared, after its cursor; and the next page's cursor
        (None: this is the last one now). A VM that appears meanwhile comes on a later page: none is
        skipped or repeated (each gets a sequence number above every earlier one's, pool claims included)."""
        labels = json.dumps(query.labels)
        rows = self._store.read(
            "SELECT data, version, seq FROM vms WHERE seq > ?1 AND (?2 IS NULL OR tenant = ?2) "
            "AND (?3 IS NULL OR user = ?3) AND (?4 IS NULL OR state = ?4) "
            "AND (?7 IS NULL OR coalesce(json_extract(data, '$.template'), 'default') = ?7) "
            "AND NOT EXISTS (SELECT 1 FROM json_each(?5) AS wanted WHERE NOT EXISTS ("
            "SELECT 1 FROM json_each(vms.data, '$.labels') AS has "
            "WHERE has.key = wanted.key AND has.value = wanted.value)) "
            "ORDER BY seq LIMIT ?6",
            (query.after, query.tenant, query.user, query.state, labels, query.limit + 1, query.template))
        records = [VmRecord.from_json(json.loads(str(data)), int(str(version))) for data, version, _ in rows]
        if len(rows) <= query.limit:
            return records, None
        return records[:query.limit], int(str(rows[query.limit - 1][2]))
