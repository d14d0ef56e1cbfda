"""The credentials at rest: AES-256-GCM (the `cryptography` package), bound to user + provider.

    sealed = version byte (1) || nonce (12 random bytes) || AES-GCM(key, nonce, plaintext, associated data)
    associated data = b"browservm-credentials 1\\n" + JSON ["<user>", "<provider>"]
    plaintext = JSON {"files": {path inside the VM: base64 of the bytes}}

The associated data binds a ciphertext to its user and provider: moved to another user's row (or read
as another provider's) it fails authentication instead of decrypting. One row per user and provider;
a newer capture replaces an older one (and an older one arriving late does not replace a newer).

The key is 32 random bytes, kept in the state directory as 64 hex digits (`vault.key`, mode 0600,
made at the first start), or given by the operator (setting `vault_key`). Its `key_id` (the first
16 hex digits of its SHA-256) is stored with each row, so a wrong key is reported as such rather
than as a tampered row. Nothing here logs or raises a credential: errors say what failed, never
with what.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from browservm.oauth.errors import CredentialsNotFound, VaultError
from browservm.secretfile import read_or_create
from browservm.store import Store

KEY_FILE = "vault.key"
_VERSION = b"\x01"
_NONCE = 12
_AD_PREFIX = b"browservm-credentials 1\n"
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def parse_key(text: str, source: str) -> bytes:
    """A vault key from its 64 hex digits; VaultError naming `source` (never the value) otherwise."""
    text = text.strip()
    if _HEX_KEY.fullmatch(text) is None:
        raise VaultError(f"the key in {source} is not 64 hex digits (32 bytes)")
    return bytes.fromhex(text)


def load_key(state_dir: Path, given: str | None = None) -> bytes:
    """The vault's key: the one given (setting `vault_key`), else `<state-dir>/vault.key`, made if missing.

    Blocking. Made with O_EXCL and mode 0600, so two controllers starting at once agree on one key and
    no other user can read it; never read through a link or from a directory another user controls
    (secretfile.py).
    """
    if given:
        return parse_key(given, "the setting vault_key (BROWSERVM_VAULT_KEY)")
    path = state_dir / KEY_FILE
    return parse_key(read_or_create(path, secrets.token_bytes(32).hex(), "the vault key"), str(path))


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"browservm vault key id\n" + key).hexdigest()[:16]


def associated_data(user: str, provider: str, tenant: str = "") -> bytes:
    # A tenant's credentials are bound to it too; the operator's own (tenant "") keep schema 4's binding.
    return _AD_PREFIX + json.dumps([tenant, user, provider] if tenant else [user, provider]).encode()


def seal(key: bytes, user: str, provider: str, files: dict[str, bytes], tenant: str = "") -> bytes:
    plaintext = json.dumps({"files": {path: base64.b64encode(data).decode() for path, data in files.items()}},
                           sort_keys=True).encode()
    nonce = secrets.token_bytes(_NONCE)
    return _VERSION + nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data(user, provider, tenant))


def unseal(key: bytes, user: str, provider: str, sealed: bytes, tenant: str = "") -> dict[str, bytes]:
    """The files sealed for `user` and `provider`; VaultError if the key, the row or its binding is wrong."""
    if len(sealed) < 1 + _NONCE + 16 or sealed[:1] != _VERSION:
        raise VaultError(f"the stored credentials of {user!r}/{provider!r} are not in a format this browservm reads")
    nonce, ciphertext = sealed[1:1 + _NONCE], sealed[1 + _NONCE:]
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, associated_data(user, provider, tenant))
    except InvalidTag:
        raise VaultError(f"the stored credentials of {user!r}/{provider!r} do not authenticate: altered, or "
                         "sealed for another user or provider") from None
    document = json.loads(plaintext)
    return {path: base64.b64decode(data) for path, data in document["files"].items()}


@dataclass(frozen=True)
class StoredCredentials:
    user: str
    provider: str
    login_id: str
    captured_at: float
    files: dict[str, bytes]


class Vault:
    """The `credentials` table, sealed. Blocking (SQLite, and AES over up to megabytes): run in a thread."""

    def __init__(self, store: Store, key: bytes) -> None:
        if len(key) != 32:
            raise VaultError("the key must be 32 bytes")
        self._store = store
        self._key = key
        self.key_id = key_id(key)

    def put(self, user: str, provider: str, login_id: str, files: dict[str, bytes],
            captured_at: float | None = None, *, tenant: str = "") -> bool:
        """Keep `files` for `user` (of `tenant`) and `provider`, replacing an older capture; False if a newer
        one is there."""
        when = time.time() if captured_at is None else captured_at
        sealed = seal(self._key, user, provider, files, tenant)
        with self._store.transaction() as db:
            written = db.execute(
                "INSERT INTO credentials (tenant, user, provider, login_id, captured_at, key_id, sealed) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, user, provider) DO UPDATE SET "
                "login_id = excluded.login_id, captured_at = excluded.captured_at, key_id = excluded.key_id, "
                "sealed = excluded.sealed WHERE excluded.captured_at >= credentials.captured_at",
                (tenant, user, provider, login_id, when, self.key_id, sealed)).rowcount
        return written == 1

    def get(self, user: str, provider: str, tenant: str = "") -> StoredCredentials:
        rows = self._store.read("SELECT login_id, captured_at, key_id, sealed FROM credentials "
                                "WHERE tenant = ? AND user = ? AND provider = ?", (tenant, user, provider))
        if not rows:
            raise CredentialsNotFound(user, provider)
        login_id, captured_at, stored_key_id, sealed = rows[0]
        if stored_key_id != self.key_id:
            raise VaultError(f"the credentials of {user!r}/{provider!r} were sealed with another key "
                             f"(key id {stored_key_id}, this controller's is {self.key_id})")
        assert isinstance(sealed, bytes)
        return StoredCredentials(user, provider, str(login_id), float(str(captured_at)),
                                 unseal(self._key, user, provider, sealed, tenant))

    def delete(self, user: str, provider: str, tenant: str = "") -> bool:
        with self._store.transaction() as db:
            return db.execute("DELETE FROM credentials WHERE tenant = ? AND user = ? AND provider = ?",
                              (tenant, user, provider)).rowcount == 1
