"""Each tenant's quota: live VMs, their memory together, logins started per hour.

Checked inside the transaction that writes the new VM or login (vm/records.py, oauth/records.py),
so concurrent creates cannot go over it together. A limit left out (None) is no limit of the
tenant's own: the host's limits still hold. The operator's own VMs (tenant "") have no quota.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from browservm.access.principal import validate_tenant
from browservm.errors import InvalidInput
from browservm.store import Store

_MAX = {"max_vms": 100_000, "max_mem_mib": 1 << 30, "logins_per_hour": 1_000_000}


@dataclass(frozen=True)
class Quota:
    max_vms: int | None = None
    max_mem_mib: int | None = None
    logins_per_hour: int | None = None

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= _MAX[field.name]):
                raise InvalidInput(field.name, value, f"must be a whole number from 0 to {_MAX[field.name]}, "
                                                      "or null for no limit")


NO_QUOTA = Quota()


class Quotas:
    """The `tenants` table. Blocking (SQLite): async callers run these in a thread."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def get(self, tenant: str) -> Quota:
        if not tenant:
            return NO_QUOTA
        rows = self._store.read("SELECT max_vms, max_mem_mib, logins_per_hour FROM tenants WHERE tenant = ?",
                                (tenant,))
        if not rows:
            return NO_QUOTA
        max_vms, max_mem, logins = rows[0]
        return Quota(*(None if value is None else int(str(value)) for value in (max_vms, max_mem, logins)))

    def set(self, tenant: str, quota: Quota) -> Quota:
        validate_tenant(tenant)
        with self._store.transaction() as db:
            db.execute("INSERT INTO tenants (tenant, max_vms, max_mem_mib, logins_per_hour) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (tenant) DO UPDATE SET max_vms = excluded.max_vms, "
                       "max_mem_mib = excluded.max_mem_mib, logins_per_hour = excluded.logins_per_hour",
                       (tenant, quota.max_vms, quota.max_mem_mib, quota.logins_per_hour))
        return quota

    def clipboard(self, tenant: str) -> str:
        """Which way the tenant's viewers' clipboard may go (a key of templates.CLIPBOARD): "both" unless set."""
        rows = self._store.read("SELECT clipboard FROM tenants WHERE tenant = ?", (tenant,)) if tenant else []
        return str(rows[0][0]) if rows and rows[0][0] is not None else "both"

    def set_clipboard(self, tenant: str, clipboard: str) -> None:
        validate_tenant(tenant)
        with self._store.transaction() as db:
            db.execute("INSERT INTO tenants (tenant, clipboard) VALUES (?, ?) "
                       "ON CONFLICT (tenant) DO UPDATE SET clipboard = excluded.clipboard", (tenant, clipboard))

    def usage(self, tenant: str, since: float) -> dict[str, int]:
        """What the tenant uses now: live VMs, their memory, logins started since `since`."""
        vms, mem = self._store.read("SELECT count(*), coalesce(sum(json_extract(data, '$.mem_mib')), 0) FROM vms "
                                    "WHERE holds_resources AND tenant = ?", (tenant,))[0]
        logins = self._store.read("SELECT count(*) FROM logins WHERE tenant = ? AND created_at >= ?",
                                  (tenant, since))[0][0]
        return {"vms": int(str(vms)), "mem_mib": int(str(mem)), "logins_last_hour": int(str(logins))}
