"""Login records in the store: who, which provider, when, how it ended, which VM. Never a secret.

Every write is a compare-and-set on a version column (as VM records are), and the store holds at
most one running login per user and provider: a partial unique index enforces it inside SQLite,
so two controllers or two requests racing cannot both start one.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from browservm.errors import InvalidInput, LimitExceeded
from browservm.oauth.errors import LoginConflict, LoginRunning
from browservm.oauth.states import LoginState
from browservm.store import Store

OUTPUT_LINES = 40  # of the tool's output, kept in a failed login's record
OUTPUT_LINE_CHARS = 400
_ID_PREFIX = "login-"


def new_login_id() -> str:
    return _ID_PREFIX + secrets.token_hex(6)


LOGIN_ID_PATTERN = r"^login-[0-9a-f]{12}$"  # for OpenAPI documents; validate_login_id is the same rule


def validate_login_id(value: str) -> str:
    body = value.removeprefix(_ID_PREFIX)
    if not value.startswith(_ID_PREFIX) or len(body) != 12 or any(c not in "0123456789abcdef" for c in body):
        raise InvalidInput("login_id", value[:64], "must be login- and 12 lowercase hex digits")
    return value


@dataclass
class LoginRecord:
    login_id: str
    user: str
    provider: str
    vm_id: str = ""
    keep_vm: bool = False
    vm_given: bool = False  # the VM was given by the request, not booted for this login
    state: LoginState = LoginState.BOOTING
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    states: dict[str, float] = field(default_factory=dict)  # seconds after created_at each state was reached
    auth_url_host: str | None = None
    exit_status: int | None = None
    output: list[str] = field(default_factory=list)  # the tool's last lines, for a failure
    hop: str | None = None  # where a failure happened: a VM hop, agent.*, tool, vault, controller
    reason: str | None = None
    files: int = 0  # credentials files captured
    sha256: str | None = None  # of the captured files (credentials_digest), to compare with the console marker
    vm_destroyed: bool = False
    tenant: str = ""  # whose (access/principal.py): "" is the operator's own
    version: int = field(default=0, compare=False)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state"] = self.state.value
        del data["version"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], version: int) -> LoginRecord:
        known = {f.name for f in dataclasses.fields(cls)} - {"version"}
        values = {key: value for key, value in data.items() if key in known}
        values["state"] = LoginState(values["state"])
        return cls(**values, version=version)


def bounded_output(lines: list[str]) -> list[str]:
    """The tool's last lines as the record keeps them: the guest sent them, so they are cut to size."""
    return [line[:OUTPUT_LINE_CHARS] for line in lines[-OUTPUT_LINES:]]


class LoginRecords:
    """The `logins` table. Blocking (SQLite): async callers run these in a thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def insert(self, record: LoginRecord, logins_per_hour: int | None = None) -> None:
        """Add a login; LoginRunning when the user has one running for the provider already, LimitExceeded
        when its tenant started `logins_per_hour` in the last hour (counted in the same transaction)."""
        try:
            with self._store.transaction() as db:
                if logins_per_hour is not None:
                    started = db.execute("SELECT count(*) FROM logins WHERE tenant = ? AND created_at >= ?",
                                         (record.tenant, record.created_at - 3600)).fetchone()[0]
                    if started >= logins_per_hour:
                        raise LimitExceeded("tenant.logins_per_hour", logins_per_hour,
                                            f"tenant {record.tenant!r} started {started} logins in the last hour")
                db.execute("INSERT INTO logins (login_id, user, tenant, provider, state, running, created_at, data, "
                           "version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                           (record.login_id, record.user, record.tenant, record.provider, record.state.value,
                            not record.state.final, record.created_at, json.dumps(record.to_json())))
        except sqlite3.IntegrityError:
            rows = self._store.read("SELECT login_id FROM logins WHERE tenant = ? AND user = ? AND provider = ? "
                                    "AND running", (record.tenant, record.user, record.provider))
            raise LoginRunning(record.user, record.provider, str(rows[0][0]) if rows else "?") from None
        record.version = 1

    def save(self, record: LoginRecord) -> None:
        """Write `record` if the stored row is still the version it was read at; else LoginConflict."""
        record.updated_at = time.time()
        with self._store.transaction() as db:
            updated = db.execute(
                "UPDATE logins SET state = ?, running = ?, data = ?, version = version + 1 "
                "WHERE login_id = ? AND version = ?",
                (record.state.value, not record.state.final, json.dumps(record.to_json()), record.login_id,
                 record.version)).rowcount
            if updated != 1:
                row = db.execute("SELECT state FROM logins WHERE login_id = ?", (record.login_id,)).fetchone()
                raise LoginConflict(record.login_id, None if row is None else str(row[0]))
        record.version += 1

    def get(self, login_id: str) -> LoginRecord | None:
        rows = self._store.read("SELECT data, version FROM logins WHERE login_id = ?", (login_id,))
        return LoginRecord.from_json(json.loads(str(rows[0][0])), int(str(rows[0][1]))) if rows else None

    def all(self, user: str | None = None, limit: int = 200, tenant: str | None = None, *,
            state: str | None = None, before: int | None = None) -> tuple[list[LoginRecord], int | None]:
        """The newest `limit` logins (of `user`, of `tenant`, in `state`), newest first, older than the login
        `before` (a page's cursor: a row number, never reused as no login row is deleted); and the next
        page's cursor (None: this is the last one)."""
        # `?1 IS NULL`: one fixed statement for each case, no SQL put together from pieces.
        rows = self._store.read("SELECT data, version, rowid FROM logins WHERE (?1 IS NULL OR user = ?1) "
                                "AND (?3 IS NULL OR tenant = ?3) AND (?4 IS NULL OR state = ?4) "
                                "AND (?5 IS NULL OR rowid < ?5) ORDER BY rowid DESC LIMIT ?2",
                                (user, limit + 1, tenant, state, before))
        logins = [LoginRecord.from_json(json.loads(str(data)), int(str(version))) for data, version, _ in rows]
        if len(rows) <= limit:
            return logins, None
        return logins[:limit], int(str(rows[limit - 1][2]))

    def running(self) -> list[LoginRecord]:
        rows = self._store.read("SELECT data, version FROM logins WHERE running ORDER BY created_at")
        return [LoginRecord.from_json(json.loads(str(data)), int(str(version))) for data, version in rows]
