"""The cluster's record in PostgreSQL: what fronts and host agents read and write, one transaction each.

Agents' writes (heartbeat, confirm, end) carry the epoch `register` gave them and are refused with
FencedOut once the host's epoch moved on: after a newer incarnation registered, or after the host
was declared lost. So an agent that was presumed dead can never overwrite what replaced it.

Fronts place VMs (`create`): sample the ready hosts with room, best of K (placement.py), and
reserve on the chosen one in one transaction: the VM's row and the host's `pending + 1`, the
latter guarded by `allocated + pending < capacity` in the same UPDATE, so fronts racing for a
host's last slot can never both get it. The host's agent is still the final authority: when it
refuses, the reservation is released and the next host tried, at most `tries` in all.

Times are the database's clock unless a `clock` is given (tests), so the grace before a host
is lost is judged by one clock, not by each front's.
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, LiteralString

import psycopg

from browservm.cluster.errors import FencedOut, HostRefused, NoCapacity, RecordConflict, RecordUnavailable
from browservm.cluster.placement import DEFAULT_K, HostLoad, choose
from browservm.cluster.schema import ROUTES, migrate
from browservm.errors import InvalidInput, VmNotFound
from browservm.ids import new_vm_id, validate_vm_id

DEFAULT_TRIES = 3
DEFAULT_PENDING_FOR = 900.0  # seconds a reservation may stay pending: longer than any create takes
HOST_STATES = ("ready", "suspect", "lost", "draining")
_NOW: LiteralString = "coalesce(%(now)s::timestamptz, statement_timestamp())"
_VM_COLUMNS: LiteralString = ("vm_id, host, generation, state, state_reason, owner, created_at, idempotency_key, "
                              "viewer_epoch, reserved_as")
_HOST_COLUMNS: LiteralString = ("name, capacity, allocated, pending, state, state_reason, heartbeat_at, agent_epoch, "
                                "viewer_address")

_SILENCE = "no heartbeat since "  # how a suspicion from silence begins (`heartbeat` clears only those)
_HOST_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # a DNS label, as Ray's node label and a VM id

Clock = Callable[[], datetime]


@dataclass(frozen=True)
class Host:
    name: str
    capacity: int
    allocated: int
    pending: int
    state: str  # one of HOST_STATES
    state_reason: str
    heartbeat_at: datetime
    agent_epoch: int
    viewer_address: str


@dataclass(frozen=True)
class Vm:
    vm_id: str
    host: str
    generation: int  # new for every placement (a VM id itself is never reused: hosts mint them fresh)
    state: str  # pending (reserved, its agent creating it), running, lost
    state_reason: str
    owner: str
    created_at: datetime
    idempotency_key: str | None
    viewer_epoch: str  # unused since viewer tokens are the host's (signed with its own epoch); kept with the schema
    reserved_as: str | None  # the reservation's id, once the host made the VM (whose id is then the host's)


@dataclass(frozen=True)
class Route:
    vm_id: str
    host: str
    generation: int
    state: str
    viewer_address: str


class _HostFull(Exception):
    """The conditional reservation found no room (or the host no longer ready): roll back, try another."""


def validate_host(name: str) -> str:
    if _HOST_NAME.fullmatch(name) is None:
        raise InvalidInput("host", name, "must be a DNS label: lowercase letters, digits, inner hyphens, 1-63")
    return name


class Record:
    """The cluster's database, a connection per thread that uses it: its methods are safe to call from
    several threads at once, and one thread's transaction never waits for another's to end."""

    def __init__(self, conninfo: str, *, password: str | None = None, clock: Clock | None = None,
                 rng: random.Random | None = None, k: int = DEFAULT_K, tries: int = DEFAULT_TRIES) -> None:
        self.conninfo = conninfo  # never holds the password: it is shown in errors
        self._password = password
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311  # spreads load; nothing secret rests on it
        self.k = k
        self.tries = tries
        self._local = threading.local()
        self._opened: list[psycopg.Connection[tuple[Any, ...]]] = []
        self._opened_lock = threading.Lock()
        migrate(self._connection())

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        conninfo = self.conninfo
        if self._password:
            conninfo = psycopg.conninfo.make_conninfo(conninfo, password=self._password)
        try:
            return psycopg.connect(conninfo, autocommit=True)
        except psycopg.OperationalError as error:
            raise RecordUnavailable(self.conninfo, str(error).strip()) from error

    def _connection(self) -> psycopg.Connection[tuple[Any, ...]]:
        """This thread's connection; a new one when it has none or lost it (the server restarted, say)."""
        connection: psycopg.Connection[tuple[Any, ...]] | None = getattr(self._local, "connection", None)
        if connection is not None and not (connection.closed or connection.broken):
            return connection
        fresh = self._connect()
        with self._opened_lock:
            if connection is not None:
                self._opened.remove(connection)
                connection.close()
            self._opened.append(fresh)
        self._local.connection = fresh
        return fresh

    def close(self) -> None:
        with self._opened_lock:
            for connection in self._opened:
                connection.close()
            self._opened.clear()

    def __enter__(self) -> Record:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Cursor[tuple[Any, ...]]]:
        """One transaction; a lost connection is RecordUnavailable, and the next transaction connects again:
        running VMs are not the record's to stop, only new work waits."""
        try:
            connection = self._connection()
            with connection.transaction(), connection.cursor() as cursor:
                yield cursor
        except (psycopg.OperationalError, psycopg.InterfaceError) as error:  # the connection, not the SQL
            raise RecordUnavailable(self.conninfo, str(error).strip()) from error

    def _now(self, **parameters: object) -> dict[str, object]:
        return {"now": self._clock() if self._clock else None, **parameters}

    @staticmethod
    def _fence(cursor: psycopg.Cursor[tuple[Any, ...]], host: str, epoch: int) -> None:
        # FOR UPDATE: a register of a newer agent waits for this write to end, or this write for it.
        row = cursor.execute("SELECT agent_epoch FROM hosts WHERE name = %s FOR UPDATE", (host,)).fetchone()
        current = None if row is None else int(row[0])
        if current != epoch:
            raise FencedOut(host, epoch, current)

    @staticmethod
    def _notify(cursor: psycopg.Cursor[tuple[Any, ...]], vm_ids: list[str]) -> None:
        for vm_id in vm_ids:
            cursor.execute("SELECT pg_notify(%s, %s)", (ROUTES, vm_id))

    # --- host agents ---------------------------------------------------------------------------

    def register(self, host: str, *, capacity: int, viewer_address: str) -> int:
        """A host's agent (re)starting: its new epoch. Its VMs stay as they are, for it to re-adopt."""
        validate_host(host)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            raise InvalidInput("capacity", capacity, "must be a whole number, 0 or more")
        if not viewer_address:
            raise InvalidInput("viewer_address", viewer_address, "must not be empty")
        with self._transaction() as cursor:
            row = cursor.execute(
                "INSERT INTO hosts (name, capacity, state, heartbeat_at, agent_epoch, viewer_address) "
                f"VALUES (%(host)s, %(capacity)s, 'ready', {_NOW}, 1, %(address)s) "
                "ON CONFLICT (name) DO UPDATE SET capacity = EXCLUDED.capacity, "
                "viewer_address = EXCLUDED.viewer_address, heartbeat_at = EXCLUDED.heartbeat_at, "
                "agent_epoch = hosts.agent_epoch + 1, silent_since = NULL, "
                "state = CASE WHEN hosts.state = 'draining' THEN 'draining' ELSE 'ready' END, "
                "state_reason = CASE WHEN hosts.state = 'draining' THEN hosts.state_reason ELSE '' END "
                "RETURNING agent_epoch",
                self._now(host=host, capacity=capacity, address=viewer_address)).fetchone()
            assert row is not None
            # The viewer address may have changed with the new agent: every route through it.
            vm_ids = cursor.execute("SELECT vm_id FROM vms WHERE host = %s", (host,)).fetchall()
            self._notify(cursor, [vm_id for (vm_id,) in vm_ids])
            return int(row[0])

    def heartbeat(self, host: str, epoch: int) -> None:
        """The agent is alive: a suspect host is ready again (within the grace, nothing was lost)."""
        with self._transaction() as cursor:
            self._fence(cursor, host, epoch)
            # A host suspected for its silence is ready again; one whose Ray node is dead stays suspect until
            # its new agent registers (a late heartbeat of the old one proves nothing about the node).
            cursor.execute(
                f"UPDATE hosts SET heartbeat_at = {_NOW}, silent_since = NULL, "
                "state = CASE WHEN state = 'suspect' AND state_reason LIKE %(silence)s THEN 'ready' ELSE state END, "
                "state_reason = CASE WHEN state = 'suspect' AND state_reason LIKE %(silence)s THEN '' "
                "ELSE state_reason END "
                "WHERE name = %(host)s", self._now(host=host, silence=_SILENCE + "%"))

    def confirm(self, host: str, epoch: int, reservation: str, vm_id: str) -> Vm:
        """The agent made the VM reserved as `reservation`, with the id `vm_id` its host gave it: running,
        counted in `allocated`, known by that id from now on (and by the reservation's still)."""
        with self._transaction() as cursor:
            self._fence(cursor, host, epoch)
            row = cursor.execute(f"UPDATE vms SET state = 'running', vm_id = %s, reserved_as = vm_id "
                                 f"WHERE vm_id = %s AND host = %s AND state = 'pending' RETURNING {_VM_COLUMNS}",
                                 (vm_id, reservation, host)).fetchone()
            if row is None:
                raise RecordConflict(f"VM {reservation}", f"no pending reservation of it on host {host} to confirm")
            cursor.execute("UPDATE hosts SET pending = pending - 1, allocated = allocated + 1 WHERE name = %s",
                           (host,))
            self._notify(cursor, [reservation, vm_id])
            return Vm(*row)

    def end(self, host: str, epoch: int, vm_id: str) -> None:
        """The agent ended a running VM: its row goes, its slot is free."""
        with self._transaction() as cursor:
            self._fence(cursor, host, epoch)
            row = cursor.execute("DELETE FROM vms WHERE vm_id = %s AND host = %s AND state = 'running' "
                                 "RETURNING vm_id, reserved_as", (vm_id, host)).fetchone()
            if row is None:
                raise RecordConflict(f"VM {vm_id}", f"not running on host {host}")
            cursor.execute("UPDATE hosts SET allocated = allocated - 1 WHERE name = %s", (host,))
            self._notify(cursor, [name for name in row if name])  # a route may be cached under either

    # --- hosts' health, as fronts and the failure detector see it ----------------------------------

    def mark_suspect(self, host: str, reason: str) -> bool:
        """No placements on a ready host from now on (its node is reported dead, say); True if it changed."""
        with self._transaction() as cursor:
            changed = cursor.execute("UPDATE hosts SET state = 'suspect', state_reason = %s "
                                     "WHERE name = %s AND state = 'ready'", (reason, host)).rowcount
            return changed == 1

    def sweep(self, *, silence: float, grace: float, pending_for: float = DEFAULT_PENDING_FOR) -> list[str]:
        """Hosts without a heartbeat for `silence` s are seen silent (ready ones become suspect); hosts seen
        silent for `grace - silence` s more (so without a heartbeat for `grace` s at least) are lost, with
        their VMs, and their agent's epoch moves on (it must register anew). Counting from when a sweep saw
        the silence, not from the last heartbeat, keeps an outage of the database (nobody could write a
        heartbeat) from losing every host when it ends. Reservations pending longer than `pending_for` s
        are released: the front placing them died (a create's own deadline is shorter), and the host's agent
        destroys what it made for one. Returns the lost hosts."""
        if not 0 < silence <= grace:
            raise InvalidInput("silence", silence, f"must be more than 0 and at most the grace ({grace})")
        with self._transaction() as cursor:
            stale = cursor.execute(
                f"DELETE FROM vms WHERE state = 'pending' AND created_at < {_NOW} - make_interval(secs => %(age)s) "
                "RETURNING vm_id, host", self._now(age=pending_for)).fetchall()
            for _, host in stale:
                cursor.execute("UPDATE hosts SET pending = pending - 1 WHERE name = %s AND pending > 0", (host,))
            self._notify(cursor, [vm_id for vm_id, _ in stale])
            parameters = self._now(silence=silence, grace=grace, silence_reason=_SILENCE)
            cursor.execute(
                f"UPDATE hosts SET silent_since = coalesce(silent_since, {_NOW}), "
                "state = CASE WHEN state = 'ready' THEN 'suspect' ELSE state END, "
                "state_reason = CASE WHEN state = 'ready' THEN %(silence_reason)s || heartbeat_at::text "
                "ELSE state_reason END "
                f"WHERE state IN ('ready', 'suspect', 'draining') "
                f"AND heartbeat_at < {_NOW} - make_interval(secs => %(silence)s)", parameters)
            lost = cursor.execute(
                "UPDATE hosts SET state = 'lost', agent_epoch = agent_epoch + 1, allocated = 0, pending = 0, "
                "state_reason = 'no heartbeat since ' || heartbeat_at::text || ', past the grace of ' "
                "|| %(grace)s::text || ' s' "
                f"WHERE state IN ('suspect', 'draining') AND heartbeat_at < {_NOW} - make_interval(secs => %(grace)s) "
                f"AND silent_since <= {_NOW} - make_interval(secs => %(grace)s - %(silence)s) "
                "RETURNING name, state_reason", parameters).fetchall()
            for name, reason in lost:
                vm_ids = cursor.execute("UPDATE vms SET state = 'lost', state_reason = %s "
                                        "WHERE host = %s AND state <> 'lost' RETURNING vm_id, reserved_as",
                                        (f"host {name} lost: {reason}", name)).fetchall()
                self._notify(cursor, [vm_id for row in vm_ids for vm_id in row if vm_id])
            return [name for name, _ in lost]

    def drain(self, host: str) -> None:
        """No new placements on `host`; its VMs run on until they end."""
        with self._transaction() as cursor:
            row = cursor.execute("SELECT state FROM hosts WHERE name = %s FOR UPDATE", (host,)).fetchone()
            if row is None:
                raise RecordConflict(f"host {host}", "not registered")
            if row[0] == "lost":
                raise RecordConflict(f"host {host}", "lost: there is nothing to drain")
            cursor.execute("UPDATE hosts SET state = 'draining', state_reason = 'drained by an operator' "
                           "WHERE name = %s", (host,))

    def resume(self, host: str) -> None:
        """A drained host takes new placements again."""
        with self._transaction() as cursor:
            changed = cursor.execute("UPDATE hosts SET state = 'ready', state_reason = '' "
                                     "WHERE name = %s AND state = 'draining'", (host,)).rowcount
            if changed != 1:
                raise RecordConflict(f"host {host}", "not draining: there is nothing to resume")

    def hosts(self) -> list[Host]:
        with self._transaction() as cursor:
            return [Host(*row) for row in cursor.execute(f"SELECT {_HOST_COLUMNS} FROM hosts ORDER BY name")]

    def host(self, name: str) -> Host:
        validate_host(name)
        with self._transaction() as cursor:
            row = cursor.execute(f"SELECT {_HOST_COLUMNS} FROM hosts WHERE name = %s", (name,)).fetchone()
        if row is None:
            raise RecordConflict(f"host {name}", "not registered")
        return Host(*row)

    # --- VMs: placement, the reservation's end, routes --------------------------------------------

    def create(self, owner: str, start: Callable[[Vm], Vm], *, idempotency_key: str | None = None) -> Vm:
        """Place a new VM for `owner` and have `start` make it on its host (the agent confirms it there).

        `start` returns the VM as its agent confirmed it (under its host's id), or raises
        HostRefused when the host's agent will not take it: the reservation is released
        and the next host tried. Any other failure releases it too and is raised: never half-made.
        The same `idempotency_key` again (also while the first is in flight) returns the same VM.
        """
        if not owner:
            raise InvalidInput("owner", owner, "must not be empty")
        reasons: list[str] = []
        tried: set[str] = set()
        for _ in range(self.tries):
            host = self._candidate(tried)
            if host is None:
                reasons.append(self._why_no_host(tried))
                break
            tried.add(host.name)
            try:
                vm, new = self._reserve(host.name, owner, idempotency_key)
            except _HostFull:
                reasons.append(f"host {host.name} filled up or left 'ready' meanwhile")
                continue
            if not new:
                return vm  # a replay: the create that made it owns it
            try:
                made = start(vm)
            except HostRefused as refusal:
                confirmed = self._release_or_made(vm.vm_id)
                if confirmed is not None:
                    return confirmed
                reasons.append(str(refusal))
                continue
            except BaseException:
                self._release_or_made(vm.vm_id)  # or, made meanwhile, kept: a replay of its key finds it
                raise
            return made
        else:
            reasons.append(f"gave up after {self.tries} tries")
        raise NoCapacity(reasons)

    def _candidate(self, tried: set[str]) -> HostLoad | None:
        with self._transaction() as cursor:
            rows = cursor.execute("SELECT name, capacity, allocated, pending FROM hosts "
                                  "WHERE state = 'ready' AND allocated + pending < capacity").fetchall()
        return choose([HostLoad(*row) for row in rows], self._rng, k=self.k, exclude=tried)

    def _why_no_host(self, tried: set[str]) -> str:
        hosts = self.hosts()
        if not hosts:
            return "no host is registered"
        counts = {state: sum(1 for h in hosts if h.state == state) for state in HOST_STATES}
        ready = [h for h in hosts if h.state == "ready"]
        taken = sum(h.allocated + h.pending for h in ready)
        summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
        already = f"; tried already: {', '.join(sorted(tried))}" if tried else ""
        return (f"no ready host with room ({summary}; ready hosts have {taken} of "
                f"{sum(h.capacity for h in ready)} slots taken{already})")

    def _reserve(self, host: str, owner: str, idempotency_key: str | None) -> tuple[Vm, bool]:
        """The VM's row and the host's pending + 1, both or neither. (vm, False) when the key was used."""
        try:
            with self._transaction() as cursor:
                parameters = self._now(vm_id=new_vm_id(), host=host, owner=owner, key=idempotency_key,
                                       viewer_epoch=new_vm_id())
                # ON CONFLICT waits for a create in flight with the same key, then yields to it.
                row = cursor.execute(
                    "INSERT INTO vms (vm_id, host, state, owner, created_at, idempotency_key, viewer_epoch) "
                    f"VALUES (%(vm_id)s, %(host)s, 'pending', %(owner)s, {_NOW}, %(key)s, %(viewer_epoch)s) "
                    f"ON CONFLICT (owner, idempotency_key) DO NOTHING RETURNING {_VM_COLUMNS}", parameters).fetchone()
                if row is None:
                    existing = cursor.execute(
                        f"SELECT {_VM_COLUMNS} FROM vms WHERE owner = %s AND idempotency_key = %s",
                        (owner, idempotency_key)).fetchone()
                    if existing is None:  # its create was undone between the two statements
                        raise _HostFull
                    return Vm(*existing), False
                reserved = cursor.execute("UPDATE hosts SET pending = pending + 1 WHERE name = %s "
                                          "AND state = 'ready' AND allocated + pending < capacity", (host,)).rowcount
                if reserved != 1:
                    raise _HostFull  # rolls the VM's row back with it
                self._notify(cursor, [row[0]])
                return Vm(*row), True
        except psycopg.errors.ForeignKeyViolation:
            raise _HostFull from None  # the host row is gone

    def release(self, vm_id: str) -> None:
        """Undo a reservation its host refused or could not make: the row goes, the host's pending - 1."""
        with self._transaction() as cursor:
            # The host's row first, as `confirm` locks it: the two racing (a create given up on just as its
            # agent confirmed) wait for each other instead of deadlocking.
            cursor.execute("SELECT 1 FROM hosts WHERE name = (SELECT host FROM vms WHERE vm_id = %s) FOR UPDATE",
                           (vm_id,))
            row = cursor.execute("DELETE FROM vms WHERE vm_id = %s AND state = 'pending' RETURNING host",
                                 (vm_id,)).fetchone()
            if row is None:
                raise RecordConflict(f"VM {vm_id}", "no pending reservation of it to release")
            cursor.execute("UPDATE hosts SET pending = pending - 1 WHERE name = %s", (row[0],))
            self._notify(cursor, [vm_id])

    def _release_or_made(self, reservation: str) -> Vm | None:
        """Release a reservation whose create failed on the front's side; the VM when its agent had confirmed
        it meanwhile (the create's answer was lost, not its work)."""
        try:
            self.release(reservation)
        except RecordConflict:
            vm = self.vm(reservation)
            if vm.state == "running":
                return vm
            raise
        return None

    def vm(self, vm_id: str) -> Vm:
        """The VM by its id, or by the id its reservation had (what a create replayed while in flight got)."""
        validate_vm_id(vm_id)
        with self._transaction() as cursor:
            row = cursor.execute(f"SELECT {_VM_COLUMNS} FROM vms WHERE vm_id = %(id)s OR reserved_as = %(id)s",
                                 {"id": vm_id}).fetchone()
        if row is None:
            raise VmNotFound(vm_id)
        return Vm(*row)

    def vms(self, *, host: str | None = None, owner: str | None = None) -> list[Vm]:
        """The VMs placed, oldest first; only those on `host` or of `owner` when given."""
        with self._transaction() as cursor:
            rows = cursor.execute(f"SELECT {_VM_COLUMNS} FROM vms WHERE (%(host)s::text IS NULL OR host = %(host)s) "
                                  "AND (%(owner)s::text IS NULL OR owner = %(owner)s) ORDER BY created_at, vm_id",
                                  {"host": host, "owner": owner}).fetchall()
        return [Vm(*row) for row in rows]

    def forget(self, vm_id: str) -> None:
        """A lost VM's row goes (its user has read why): there is nothing left of it to end on a host."""
        with self._transaction() as cursor:
            row = cursor.execute("DELETE FROM vms WHERE vm_id = %s AND state = 'lost' RETURNING vm_id",
                                 (vm_id,)).fetchone()
            if row is None:
                raise RecordConflict(f"VM {vm_id}", "not lost: its host ends it")
            self._notify(cursor, [vm_id])

    def route(self, vm_id: str) -> Route:
        """Where a VM's viewer goes: its host, and the address of that host's proxy."""
        validate_vm_id(vm_id)
        with self._transaction() as cursor:
            row = cursor.execute("SELECT v.vm_id, v.host, v.generation, v.state, h.viewer_address "
                                 "FROM vms v JOIN hosts h ON h.name = v.host "
                                 "WHERE v.vm_id = %(id)s OR v.reserved_as = %(id)s", {"id": vm_id}).fetchone()
        if row is None:
            raise VmNotFound(vm_id)
        return Route(*row)
