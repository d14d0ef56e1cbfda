"""Each user's profile key and sealed profile, on the host.

    profiles table    (tenant, user) -> the user's 32-byte profile key, sealed with the vault's key:
                      version || nonce || AES-256-GCM(vault key, nonce, profile key,
                                                      b"browservm-profile-key 1\\n" + JSON [tenant, user])
    <state>/profiles/<sha256 of JSON [tenant, user], 32 hex>.sealed
                      the profile as the guest sealed it with the profile key (guest/profile_keeper.py);
                      the controller never opens it

So the host holds no profile in plaintext, and a profile file moved to another user's name opens under
neither that user's key nor binding. Files are written whole (a temporary file, fsync, rename); a save
larger than the bound is refused and the last one kept. Blocking: run in a thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from browservm.errors import ProfileInUse, ProfileNotFound
from browservm.oauth.errors import VaultError
from browservm.oauth.vault import key_id
from browservm.store import Store
from browservm.vm.records import PROFILE_HOLDER

_VERSION = b"\x01"
_NONCE = 12
_AD_PREFIX = b"browservm-profile-key 1\n"


def binding(tenant: str, user: str) -> bytes:
    """What a user's profile is bound to, in its key's seal and in the guest's seal of the profile."""
    return json.dumps([tenant, user]).encode()


@dataclass(frozen=True)
class ProfileInfo:
    tenant: str
    user: str
    size: int  # bytes of the sealed profile last saved (0: never saved)
    saved_at: float | None
    in_use_by: str | None  # the live VM that has it


class ProfileStore:
    def __init__(self, store: Store, vault_key: bytes, directory: Path, max_bytes: int) -> None:
        if len(vault_key) != 32:
            raise VaultError("the key must be 32 bytes")
        self._store = store
        self._vault_key = vault_key
        self._key_id = key_id(vault_key)
        self.directory = directory
        self.max_bytes = max_bytes

    def path(self, tenant: str, user: str) -> Path:
        return self.directory / f"{hashlib.sha256(binding(tenant, user)).hexdigest()[:32]}.sealed"

    def key(self, tenant: str, user: str) -> bytes:
        """The user's profile key, made (and its row written) the first time."""
        select = "SELECT key_id, sealed_key FROM profiles WHERE tenant = ? AND user = ?"
        rows = self._store.read(select, (tenant, user))
        if not rows:
            nonce = secrets.token_bytes(_NONCE)
            sealed = _VERSION + nonce + AESGCM(self._vault_key).encrypt(nonce, secrets.token_bytes(32),
                                                                        _AD_PREFIX + binding(tenant, user))
            with self._store.transaction() as db:  # of two first uses at once, one key is kept
                db.execute("INSERT OR IGNORE INTO profiles (tenant, user, key_id, sealed_key) VALUES (?, ?, ?, ?)",
                           (tenant, user, self._key_id, sealed))
                rows = [db.execute(select, (tenant, user)).fetchone()]
        key_id_stored, sealed_key = rows[0]
        if not isinstance(sealed_key, bytes):
            raise VaultError(f"the profile key of {user[:64]!r} is not stored as bytes: the row was altered")
        return self._open(tenant, user, str(key_id_stored), sealed_key)

    def _open(self, tenant: str, user: str, stored_key_id: str, sealed: bytes) -> bytes:
        whose = f"{user[:64]!r}" + (f" of tenant {tenant[:64]!r}" if tenant else "")
        if stored_key_id != self._key_id:
            raise VaultError(f"the profile key of {whose} was sealed with another vault key (id {stored_key_id})")
        try:
            return AESGCM(self._vault_key).decrypt(sealed[1:1 + _NONCE], sealed[1 + _NONCE:],
                                                   _AD_PREFIX + binding(tenant, user))
        except InvalidTag:
            raise VaultError(f"the profile key of {whose} does not authenticate: altered, or another user's") \
                from None

    def read(self, tenant: str, user: str) -> bytes:
        """The sealed profile last saved; b"" when there is none yet."""
        try:
            with open(self.path(tenant, user), "rb") as sealed:
                data = sealed.read(self.max_bytes + 1)
        except FileNotFoundError:
            return b""
        if len(data) > self.max_bytes:
            raise VaultError(f"the profile of {user[:64]!r} is over the {self.max_bytes} bytes kept: the bound was "
                             "lowered since it was saved; delete it (DELETE /v1/users/{user}/profile)")
        return data

    def write(self, tenant: str, user: str, sealed: bytes) -> None:
        """Keep `sealed` as the user's profile, whole or not at all."""
        if len(sealed) > self.max_bytes:
            raise VaultError(f"the profile is {len(sealed)} bytes sealed, over the {self.max_bytes} kept")
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = self.path(tenant, user)
        staged = target.with_name(f"{target.name}.{secrets.token_hex(4)}.new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(sealed)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staged, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staged)
            raise
        with self._store.transaction() as db:
            db.execute("UPDATE profiles SET size = ?, saved_at = ? WHERE tenant = ? AND user = ?",
                       (len(sealed), time.time(), tenant, user))

    def info(self, tenant: str, user: str) -> ProfileInfo:
        rows = self._store.read("SELECT size, saved_at FROM profiles WHERE tenant = ? AND user = ?", (tenant, user))
        if not rows:
            raise ProfileNotFound(tenant, user)
        size, saved_at = rows[0]
        return ProfileInfo(tenant, user, int(str(size)), None if saved_at is None else float(str(saved_at)),
                           self._holder(tenant, user))

    def _holder(self, tenant: str, user: str) -> str | None:
        rows = self._store.read(PROFILE_HOLDER, (tenant, user))
        return str(rows[0][0]) if rows else None

    def delete(self, tenant: str, user: str) -> None:
        """Forget the user's profile and its key; ProfileInUse while a live VM has it, ProfileNotFound if none."""
        with self._store.transaction() as db:
            holder = db.execute(PROFILE_HOLDER, (tenant, user)).fetchone()
            if holder is not None:
                raise ProfileInUse(tenant, user, str(holder[0]))
            if db.execute("DELETE FROM profiles WHERE tenant = ? AND user = ?", (tenant, user)).rowcount != 1:
                raise ProfileNotFound(tenant, user)
            # In the transaction: a VM that starts meanwhile waits for it, then makes a new key and profile.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path(tenant, user))
