"""The cluster's tables, made and brought up to date by numbered migrations.

A migration is applied once, in order, in one transaction with its version row; an advisory lock
makes fronts that start together wait for each other instead of applying the same step twice.
Never edit a migration that has shipped: add the next one.

hosts   one row per host: its agent's epoch (fencing), capacity and counts, state, heartbeat,
        the address of its viewer proxy
vms     one row per VM placed: its host and route generation, state, owner, the create's
        Idempotency-Key, the viewer epoch in its viewer tokens' signatures; once its host made it, its id
        is the host's and `reserved_as` the reservation's

Every change of a VM's route (placed, confirmed, ended, lost) sends a NOTIFY on `ROUTES` with
the VM's id, in the same transaction, so route caches hear of it only when it is committed.
"""

from __future__ import annotations

from typing import LiteralString

import psycopg

from browservm.cluster.errors import RecordConflict

ROUTES = "browservm_routes"  # the LISTEN/NOTIFY channel of route changes
_LOCK = 0x62766D  # advisory lock key held while migrating ("bvm")

MIGRATIONS: tuple[LiteralString, ...] = (
    # 1: hosts and VMs
    """
    CREATE TABLE hosts (
        name            text PRIMARY KEY CHECK (name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$'),
        capacity        integer NOT NULL CHECK (capacity >= 0),
        allocated       integer NOT NULL DEFAULT 0 CHECK (allocated >= 0),
        pending         integer NOT NULL DEFAULT 0 CHECK (pending >= 0),
        state           text NOT NULL CHECK (state IN ('ready', 'suspect', 'lost', 'draining')),
        state_reason    text NOT NULL DEFAULT '',
        heartbeat_at    timestamptz NOT NULL,
        agent_epoch     bigint NOT NULL CHECK (agent_epoch > 0),
        viewer_address  text NOT NULL
    );
    CREATE SEQUENCE route_generation;
    CREATE TABLE vms (
        vm_id           text PRIMARY KEY,
        host            text NOT NULL REFERENCES hosts (name),
        generation      bigint NOT NULL DEFAULT nextval('route_generation'),
        state           text NOT NULL CHECK (state IN ('pending', 'running', 'lost')),
        state_reason    text NOT NULL DEFAULT '',
        owner           text NOT NULL,
        created_at      timestamptz NOT NULL,
        idempotency_key text,
        viewer_epoch    text NOT NULL,
        -- per owner: another user's replayed key must never return this user's VM
        UNIQUE (owner, idempotency_key)
    );
    CREATE INDEX vms_by_host ON vms (host);
    """,
    # 2: a VM's id is the one its host gave it (a host may hand out a VM of its warm pool, named before
    # the placement): the reservation's id, under which the create began, is kept beside it
    """
    ALTER TABLE vms ADD COLUMN reserved_as text UNIQUE;
    """,
    # 3: since when the sweep has seen a host silent: a host is lost only once seen silent for long
    # enough, so an outage of the database itself (no heartbeat could be written) loses nothing
    """
    ALTER TABLE hosts ADD COLUMN silent_since timestamptz;
    """,
)


def version(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    """The last migration applied (0 on an empty database)."""
    exists = connection.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if exists is None or not exists[0]:
        return 0
    row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(str(row[0])) if row is not None and row[0] is not None else 0


def migrate(connection: psycopg.Connection[tuple[object, ...]]) -> int:
    """Apply the migrations this database lacks; returns the version it is at now."""
    with connection.transaction():
        connection.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        connection.execute("CREATE TABLE IF NOT EXISTS schema_version "
                           "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        current = version(connection)
        if current > len(MIGRATIONS):
            raise RecordConflict("the cluster's database", f"its schema is at version {current}, newer than this "
                                 f"browservm knows ({len(MIGRATIONS)}): upgrade browservm on this machine")
        for number, statements in enumerate(MIGRATIONS[current:], start=current + 1):
            connection.execute(statements)
            connection.execute("INSERT INTO schema_version (version) VALUES (%s)", (number,))
    return len(MIGRATIONS)
