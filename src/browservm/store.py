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
    leased_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS vms (
    vm_id           TEXT PRIMARY KEY,
    user            TEXT NOT NULL,
    state           TEXT NOT NULL,
    holds_resources INTEGER NOT NULL,
    data            TEXT NOT NULL,
    version         INTEGER NOT NULL DEFAULT 0  -- bumped by every write: the compare-and-set token
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
    version    INTEGER NOT NULL DEFAULT 0
);
-- One running login per user and provider, held by SQLite itself.
CREATE UNIQUE INDEX IF NOT EXISTS logins_one_running ON logins (user, provider) WHERE running;
CREATE INDEX IF NOT EXISTS logins_by_time ON logins (created_at);
-- The credential vault (oauth/vault.py): AES-GCM ciphertext only, bound to user and provider.
CREATE TABLE IF NOT EXISTS credentials (
    user        TEXT NOT NULL,
    provider    TEXT NOT NULL,
    login_id    TEXT NOT NULL,
    captured_at REAL NOT NULL,
    key_id      TEXT NOT NULL,
    sealed      BLOB NOT NULL,
    PRIMARY KEY (user, provider)
);
"""
# 4: the logins and credentials tables. A schema-3 database gets them from the CREATE ... IF NOT EXISTS
# statements above at its next open (its other tables are unchanged), then is marked 4.
_SCHEMA_VERSION = 4
_BUSY_TIMEOUT_S = 30.0


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
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                columns = {row[1] for row in db.execute("PRAGMA table_info(vms)")}
                if "version" not in columns:  # a state directory from schema 2
                    db.execute("ALTER TABLE vms ADD COLUMN version INTEGER NOT NULL DEFAULT 0")
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
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
