"""Durable state: one SQLite database in the state directory.

Every change is one transaction (`BEGIN IMMEDIATE`, write-ahead log), so a
crash leaves either the old state or the new one. Several
processes may share the file: the immediate transaction serialises writers,
which is what makes two concurrent leases safe.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from browservm.errors import StateError
from browservm.secretfile import check_state_dir

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    vm_id     TEXT PRIMARY KEY,
    address   INTEGER NOT NULL UNIQUE,
    tap       TEXT NOT NULL UNIQUE,
    mac       TEXT NOT NULL UNIQUE,
    leased_at REAL NOT NULL,
    egress    TEXT  -- the VM's template's egress policy (egress.py) as JSON; NULL: the host's
);
CREATE TABLE IF NOT EXISTS vms (
    vm_id           TEXT PRIMARY KEY,
    user            TEXT NOT NULL,
    state           TEXT NOT NULL,
    holds_resources INTEGER NOT NULL,
    data            TEXT NOT NULL,
    version         INTEGER NOT NULL DEFAULT 0,  -- bumped by every write: the compare-and-set token
    tenant          TEXT NOT NULL DEFAULT '',
    seq             INTEGER  -- the order VMs appeared in, for listings' cursors (vm/records.py)
);
-- What `host up` created, so `host down` removes exactly that and nothing else.
CREATE TABLE IF NOT EXISTS host_objects (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    detail     TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
-- Logins (issue 9, oauth/records.py): who, which provider, when, outcome, which VM (never a secret).
CREATE TABLE IF NOT EXISTS logins (
    login_id   TEXT PRIMARY KEY,
    user       TEXT NOT NULL,
    provider   TEXT NOT NULL,
    state      TEXT NOT NULL,
    running    INTEGER NOT NULL,
    created_at REAL NOT NULL,
    data       TEXT NOT NULL,
    version    INTEGER NOT NULL DEFAULT 0,
    tenant     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS logins_by_time ON logins (created_at);
-- The credential vault (oauth/vault.py): AES-GCM ciphertext only, bound to tenant, user and provider.
CREATE TABLE IF NOT EXISTS credentials (
    tenant      TEXT NOT NULL DEFAULT '',
    user        TEXT NOT NULL,
    provider    TEXT NOT NULL,
    login_id    TEXT NOT NULL,
    captured_at REAL NOT NULL,
    key_id      TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    PRIMARY KEY (tenant, user, provider)
);
-- API keys (access/keys.py): only each key's SHA-256, never the key.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id       TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    tenant       TEXT NOT NULL,
    digest       TEXT NOT NULL UNIQUE,
    created_at   REAL NOT NULL,
    last_used_at REAL,
    revoked_at   REAL
);
-- Each tenant's quota (access/quotas.py); NULL is no limit of the tenant's own.
CREATE TABLE IF NOT EXISTS tenants (
    tenant          TEXT PRIMARY KEY,
    max_vms         INTEGER,
    max_mem_mib     INTEGER,
    logins_per_hour INTEGER,
    clipboard       TEXT  -- which way its viewers' clipboard may go (templates.CLIPBOARD); NULL: both
);
-- The audit trail (access/audit.py): appended to, and pruned by age only.
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at         REAL NOT NULL,
    key_id     TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT NOT NULL,
    outcome    TEXT NOT NULL,
    detail     TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
-- Webhooks (webhooks/records.py). The secret is kept as is, not hashed: every delivery is signed with it.
CREATE TABLE IF NOT EXISTS webhooks (
    id         TEXT PRIMARY KEY,
    tenant     TEXT NOT NULL,
    url        TEXT NOT NULL,
    events     TEXT NOT NULL,  -- JSON list of event types
    secret     TEXT NOT NULL,
    created_at REAL NOT NULL,
    disabled   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS webhooks_by_tenant ON webhooks (tenant);
-- Each event to each webhook: pending until delivered or given up on (failed).
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL,
    tenant          TEXT NOT NULL,
    event           TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    body            TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state           TEXT NOT NULL,
    last_status     INTEGER,
    last_error      TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    delivered_at    REAL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS deliveries_by_webhook ON deliveries (webhook_id, id);
CREATE INDEX IF NOT EXISTS deliveries_pending_by_tenant ON deliveries (tenant, id) WHERE state = 'pending';
-- POSTs done under an Idempotency-Key (api/idempotency.py): what each answered, to answer a replay alike.
CREATE TABLE IF NOT EXISTS idempotency (
    id          TEXT PRIMARY KEY,  -- SHA-256 of the caller's credential and its key: neither is kept
    fingerprint TEXT NOT NULL,     -- SHA-256 of the request: method, path, query, body
    state       TEXT NOT NULL,     -- running, done
    owner       TEXT NOT NULL,     -- the process that runs it (a row left running by another ended with it)
    status      INTEGER,
    body        BLOB,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_by_time ON idempotency (created_at);
-- Each user's browser profile (profiles/): its key, sealed with the vault's key; the profile itself is a
-- file of ciphertext made in the guest (profiles/<name>.sealed), never plaintext on the host.
CREATE TABLE IF NOT EXISTS profiles (
    tenant     TEXT NOT NULL,
    user       TEXT NOT NULL,
    key_id     TEXT NOT NULL,   -- the vault key's id, to tell a wrong vault key from a tampered row
    sealed_key BLOB NOT NULL,
    size       INTEGER NOT NULL DEFAULT 0,  -- bytes of the sealed profile last saved
    saved_at   REAL,            -- NULL: never saved (a new profile)
    PRIMARY KEY (tenant, user)
);
CREATE TRIGGER IF NOT EXISTS audit_append_only BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit trail is append-only'); END
"""
# 4: the logins and credentials tables. A schema-3 database gets them from the CREATE ... IF NOT EXISTS
# statements above at its next open (its other tables are unchanged), then is marked 4.
# 5: tenants (issue 21): api_keys, tenants and audit; a `tenant` column on vms and logins, and in the
# credentials' key (_add_tenants).
# 6: webhooks and their deliveries (issue 21): new tables only, made by the statements above.
# 7: vms' `seq`, the list API's cursor (issue 21), added to older databases in _add_tenants; idempotency.
# 8: leases' `egress`, a template's egress policy (issue 21), added to older databases in _add_tenants.
# 9: browser profiles (issue 22): the profiles table, and the index that keeps one live VM per profile;
#    tenants' `clipboard` (issue 22), added to older databases in _add_tenants.
_SCHEMA_VERSION = 9
_BUSY_TIMEOUT_S = 30.0


def _split(schema: str) -> list[str]:
    """The schema's statements: split at each `;` that ends a line (a trigger's body has its own `;`).
    One by one, not executescript: that would commit the transaction they run in."""
    return [statement.strip() for statement in schema.split(";\n") if statement.strip()]


def _add_tenants(db: sqlite3.Connection) -> None:
    """Schema 5 over an older database: what there was belongs to no tenant (""), the operator's own."""
    for table in ("vms", "logins"):
        if "tenant" not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
    if "seq" not in {row[1] for row in db.execute("PRAGMA table_info(vms)")}:
        db.execute("ALTER TABLE vms ADD COLUMN seq INTEGER")
        db.execute("UPDATE vms SET seq = rowid")
    db.execute("CREATE INDEX IF NOT EXISTS vms_by_seq ON vms (seq)")
    if "egress" not in {row[1] for row in db.execute("PRAGMA table_info(leases)")}:
        db.execute("ALTER TABLE leases ADD COLUMN egress TEXT")
    # One running login per tenant, user and provider, held by SQLite itself.
    db.execute("DROP INDEX IF EXISTS logins_one_running")
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS logins_one_running_per_tenant ON logins (tenant, user, provider) "
               "WHERE running")
    if "clipboard" not in {row[1] for row in db.execute("PRAGMA table_info(tenants)")}:
        db.execute("ALTER TABLE tenants ADD COLUMN clipboard TEXT")
    # One live VM per user with their persistent profile (schema 9): a second is refused by SQLite itself.
    db.execute("CREATE UNIQUE INDEX IF NOT EXISTS vms_one_per_profile ON vms (tenant, user) "
               "WHERE json_extract(data, '$.profile') = 'persistent' AND state IN ('creating', 'booting', 'ready')")
    if "tenant" not in {row[1] for row in db.execute("PRAGMA table_info(credentials)")}:
        # A primary key cannot change in place: the table is copied.
        db.execute("ALTER TABLE credentials RENAME TO credentials_4")
        db.execute("CREATE TABLE credentials (tenant TEXT NOT NULL DEFAULT '', user TEXT NOT NULL, "
                   "provider TEXT NOT NULL, login_id TEXT NOT NULL, captured_at REAL NOT NULL, key_id TEXT NOT NULL, "
                   "sealed BLOB NOT NULL, PRIMARY KEY (tenant, user, provider))")
        db.execute("INSERT INTO credentials (tenant, user, provider, login_id, captured_at, key_id, sealed) "
                   "SELECT '', user, provider, login_id, captured_at, key_id, sealed FROM credentials_4")
        db.execute("DROP TABLE credentials_4")


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Its directory is the state directory: one another user could write would let them swap the
        # database, or plant links where the chmods below and the key files go (secretfile.py).
        try:
            check_state_dir(path.parent)
        except StateError as exc:
            raise StateError(str(path), f"cannot keep the store here: {exc.reason}") from exc
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Shared by the caller's thread and the host network's worker thread, one at a time.
            self._db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
            self._lock = threading.RLock()
            self._db.execute("PRAGMA journal_mode=WAL")
            # In WAL mode, NORMAL keeps every commit atomic and durable across a crash of
            # the controller; only an OS crash or power loss can undo the last commits,
            # and that also ends every VM. It saves an fsync (0.4 ms) per lease.
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise StateError(str(path), f"written by a newer browservm (schema {version})")
            with self.transaction() as db:
                for statement in _split(_SCHEMA):
                    db.execute(statement)
                columns = {row[1] for row in db.execute("PRAGMA table_info(vms)")}
                if "version" not in columns:  # a state directory from schema 2
                    db.execute("ALTER TABLE vms ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
                _add_tenants(db)
                db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            # Whatever existed before: the store holds leases, VM records and (issue 9) sealed
            # credentials, and SQLite's -wal and -shm files hold the same data.
            os.chmod(path.parent, 0o700)
            for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if file.exists():
                    os.chmod(file, 0o600)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(str(path), f"cannot open the state database: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic change; the write lock is taken at the start, not at the first write."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(str(self.path), f"cannot start a transaction: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StateError(str(self.path), f"cannot commit: {exc}") from exc

    def read(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def claim(self, key: str, value: str) -> None:
        """Record `value` under `key`, or fail if another value is already recorded.

        Binds a state directory to one network namespace, so two deployments
        cannot share (and corrupt) one set of leases.
        """
        with self.transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row is None:
                db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
            elif row[0] != value:
                raise StateError(str(self.path), f"belongs to {key} {row[0]!r}, not {value!r}; "
                                 "use another --state-dir")

    def unclaim(self, key: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def close(self) -> None:
        # Under the lock: closing a connection another thread is using crashes the interpreter (sqlite3 in
        # CPython 3.11); this way that thread finishes first, and a later use is a ProgrammingError.
        with self._lock:
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
