"""What the login package raises, under browservm.errors.BrowserVMError (kept apart from errors.py, whose
roots the guest shares). The API maps each to a status in api/logins.py.

    BrowserVMError
    └── LoginError
        ├── CatalogError          a provider entry is wrong: `source`, `provider`, `field`, `reason`
        ├── UnknownProvider       no provider of that name in the catalog: `provider`, `known`
        ├── LoginNotFound         no login with this id: `login_id`
        ├── LoginRunning          one login per user and provider at a time: `user`, `provider`, `login_id`
        ├── LoginTransition       a state change the state machine refuses: `login_id`, `current`, `new`
        ├── LoginConflict         a login's record changed under a writer (compare-and-set): `login_id`
        ├── AgentError            a hop to the guest's agent failed: `hop`, `reason`
        ├── CredentialsNotFound   nothing stored for this user and provider: `user`, `provider`
        └── VaultError            the vault cannot be used: `reason` (never a secret)
"""

from __future__ import annotations

from browservm.errors import BrowserVMError


class LoginError(BrowserVMError):
    """Base of the login package's errors."""


class CatalogError(LoginError):
    def __init__(self, source: str, provider: str, field: str, reason: str) -> None:
        self.source = source
        self.provider = provider
        self.field = field
        self.reason = reason
        where = f"provider {provider!r}" + (f", field {field!r}" if field else "")
        super().__init__(f"providers catalog {source}: {where}: {reason}")


class UnknownProvider(LoginError):
    def __init__(self, provider: str, known: list[str]) -> None:
        self.provider = provider
        self.known = known
        super().__init__(f"no provider {provider[:64]!r}; the catalog has {', '.join(known) or 'none'}")


class LoginNotFound(LoginError):
    def __init__(self, login_id: str) -> None:
        self.login_id = login_id
        super().__init__(f"no login {login_id[:64]}")


class LoginRunning(LoginError):
    def __init__(self, user: str, provider: str, login_id: str) -> None:
        self.user = user
        self.provider = provider
        self.login_id = login_id
        super().__init__(f"user {user!r} already has a {provider} login running ({login_id}); "
                         "wait for it or cancel it (DELETE /v1/logins/{id})")


class LoginTransition(LoginError):
    def __init__(self, login_id: str, current: str, new: str) -> None:
        self.login_id = login_id
        self.current = current
        self.new = new
        super().__init__(f"login {login_id}: cannot go from {current} to {new}")


class LoginConflict(LoginError):
    def __init__(self, login_id: str, found: str | None) -> None:
        self.login_id = login_id
        self.found = found
        now = "it is gone" if found is None else f"it is {found} now"
        super().__init__(f"login {login_id} was changed by someone else: {now}")


class AgentError(LoginError):
    """One hop between the controller and the guest's agent failed: `hop` names it (agent.*)."""

    def __init__(self, hop: str, reason: str) -> None:
        self.hop = hop
        self.reason = reason
        super().__init__(f"{hop}: {reason}")


class CredentialsNotFound(LoginError):
    def __init__(self, user: str, provider: str) -> None:
        self.user = user
        self.provider = provider
        super().__init__(f"no credentials stored for user {user[:64]!r} and provider {provider[:64]!r}")


class VaultError(LoginError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"credential vault: {reason}")
