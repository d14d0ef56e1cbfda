"""Who a request comes from: the key it was signed with, that key's role and its tenant.

    admin    everything, every tenant's VMs, logins, credentials, keys and audit
    tenant   only what belongs to its own tenant; what another tenant has is "not found" to it

The operator's own VMs (and every VM from before tenants) belong to no tenant: "".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from browservm.errors import InvalidInput

TENANT_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
_TENANT = re.compile(TENANT_PATTERN)


class Role(StrEnum):
    ADMIN = "admin"
    TENANT = "tenant"


class Forbidden(Exception):
    """The key may not do this at all (403): not "not found", which hides what another tenant has."""

    def __init__(self, key_id: str, what: str) -> None:
        self.key_id = key_id
        super().__init__(f"key {key_id} may not {what}")


def validate_tenant(value: object, field: str = "tenant") -> str:
    if not isinstance(value, str) or not _TENANT.match(value):
        raise InvalidInput(field, value, "must be 1-32 of a-z, 0-9 and '-', starting with a letter or digit")
    return value


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    role: Role
    tenant: str  # "" for an admin key

    @property
    def admin(self) -> bool:
        return self.role == Role.ADMIN

    def sees(self, tenant: str) -> bool:
        """May this key see (and act on) what belongs to `tenant`?"""
        return self.admin or tenant == self.tenant

    def tenant_for(self, asked: str | None) -> str:
        """The tenant a new VM or login of this key's belongs to: a tenant key's own; an admin's, the one
        it names (none: the operator's own)."""
        if self.admin:
            return "" if not asked else validate_tenant(asked)  # none, or "": the operator's own
        if asked is not None and asked != self.tenant:
            raise Forbidden(self.key_id, f"act for tenant {asked!r}")
        return self.tenant

    def only_admin(self, what: str) -> None:
        if not self.admin:
            raise Forbidden(self.key_id, what)

    def tenant_filter(self, asked: str | None) -> str | None:
        """Whose records a listing shows: an admin's choice (None: everyone's); a tenant key's own, always."""
        if self.admin:
            return None if asked is None else validate_tenant(asked) if asked else ""
        if asked is not None and asked != self.tenant:
            raise Forbidden(self.key_id, f"read tenant {asked!r}")
        return self.tenant


# The state directory's api.key (access/keys.py OPERATOR_KEY_ID): also whom the controller's own calls act as.
OPERATOR = Principal("operator", "operator (api.key)", Role.ADMIN, "")
