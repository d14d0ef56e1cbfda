"""API keys: each with a name, a role and a tenant, kept in the store as a SHA-256 digest only.

A key is `bvm_<key id>_<secret>`, shown once when it is made. A request's key is looked up by its
digest (a key has 256 bits of secret: a plain hash is enough, no slow KDF needed), so revoking a key
takes effect at its next request, in every process sharing the store. The state directory's api.key
(or BROWSERVM_API_KEY) is the admin key `operator`: adopted at every start, never revoked by API.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from browservm.access.principal import Principal, Role, validate_tenant
from browservm.errors import InvalidInput, LimitExceeded
from browservm.names import is_name
from browservm.store import Store

OPERATOR_KEY_ID = "operator"
MAX_KEYS = 1000  # live keys, all tenants together: each is a row read at every request
_LAST_USED_EVERY_S = 60.0  # a key's last-used time is written at most this often (a write per request otherwise)


class KeyNotFound(LookupError):
    def __init__(self, key_id: str) -> None:
        self.key_id = key_id
        super().__init__(f"no key {key_id!r}")


class KeyRefused(Exception):
    """A change to a key that would do harm: why, in words."""


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    name: str
    role: Role
    tenant: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    @classmethod
    def of(cls, row: tuple[object, ...]) -> ApiKey:
        key_id, name, role, tenant, created, used, revoked = row
        return cls(str(key_id), str(name), Role(str(role)), str(tenant), float(str(created)),
                   None if used is None else float(str(used)), None if revoked is None else float(str(revoked)))

    def principal(self) -> Principal:
        return Principal(self.key_id, self.name, self.role, self.tenant)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def validate_name(value: object) -> str:
    if not is_name(value):
        raise InvalidInput("name", value, "must be 1-64 characters, not only spaces, without control characters")
    return value


class KeyRing:
    """The `api_keys` table. Blocking (SQLite): async callers run these in a thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def adopt_operator(self, key: str) -> None:
        """Make `key` (the state directory's api.key) the admin key `operator`, whatever it was before."""
        with self._store.transaction() as db:
            db.execute("INSERT INTO api_keys (key_id, name, role, tenant, digest, created_at) "
                       "VALUES (?, 'operator (api.key)', 'admin', '', ?, ?) ON CONFLICT (key_id) DO UPDATE SET "
                       "digest = excluded.digest, revoked_at = NULL",
                       (OPERATOR_KEY_ID, digest(key), time.time()))

    def create(self, name: str, role: Role | str, tenant: str | None) -> tuple[ApiKey, str]:
        """A new key and its secret, which is kept nowhere: the caller shows it once."""
        name = validate_name(name)
        try:
            role = Role(role)
        except ValueError:
            raise InvalidInput("role", role, "must be admin or tenant") from None
        if role == Role.TENANT:
            tenant = validate_tenant(tenant)
        elif tenant:
            raise InvalidInput("tenant", tenant, "an admin key belongs to no tenant: it sees every one")
        key_id = secrets.token_hex(6)
        key = f"bvm_{key_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        with self._store.transaction() as db:
            live = db.execute("SELECT count(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]
            if live >= MAX_KEYS:
                raise LimitExceeded("max_keys", MAX_KEYS, f"there are {live} keys; revoke unused ones first")
            db.execute("INSERT INTO api_keys (key_id, name, role, tenant, digest, created_at) "
                       "VALUES (?, ?, ?, ?, ?, ?)", (key_id, name, role.value, tenant or "", digest(key), now))
        return ApiKey(key_id, name, role, tenant or "", now, None, None), key

    def all(self, tenant: str | None = None) -> list[ApiKey]:
        rows = self._store.read("SELECT key_id, name, role, tenant, created_at, last_used_at, revoked_at FROM api_keys "
                                "WHERE ?1 IS NULL OR tenant = ?1 ORDER BY created_at", (tenant,))
        return [ApiKey.of(row) for row in rows]

    def get(self, key_id: str) -> ApiKey:
        rows = self._store.read("SELECT key_id, name, role, tenant, created_at, last_used_at, revoked_at FROM api_keys "
                                "WHERE key_id = ?", (key_id,))
        if not rows:
            raise KeyNotFound(key_id)
        return ApiKey.of(rows[0])

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke a key (idempotent): at once, for every process sharing the store."""
        if key_id == OPERATOR_KEY_ID:
            raise KeyRefused("the key `operator` is the state directory's api.key: replace that file and restart "
                             "the controller to change it")
        with self._store.transaction() as db:
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                       (time.time(), key_id))
        return self.get(key_id)

    def live(self, key_id: str) -> Principal | None:
        """The principal of key `key_id` while it is not revoked (a session signed in with it)."""
        rows = self._store.read("SELECT key_id, name, role, tenant, created_at, last_used_at, revoked_at FROM api_keys "
                                "WHERE key_id = ? AND revoked_at IS NULL", (key_id,))
        return ApiKey.of(rows[0]).principal() if rows else None

    def authenticate(self, key: str) -> Principal | None:
        """The principal of a live key, or None; notes when it was used (at most once a minute)."""
        if not key or len(key) > 256:
            return None
        rows = self._store.read("SELECT key_id, name, role, tenant, created_at, last_used_at, revoked_at FROM api_keys "
                                "WHERE digest = ? AND revoked_at IS NULL", (digest(key),))
        if not rows:
            return None
        found = ApiKey.of(rows[0])
        now = time.time()
        if found.last_used_at is None or now - found.last_used_at > _LAST_USED_EVERY_S:
            with self._store.transaction() as db:
                db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (now, found.key_id))
        return found.principal()
