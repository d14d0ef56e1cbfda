"""`browservm tenant show T`, `browservm tenant quota T [--max-vms N] [--max-mem-mib N]
[--logins-per-hour N]` and `browservm tenant clipboard T both|paste|copy|none`: a tenant's quota and
clipboard rule beside what it uses now (access/quotas.py).

`tenant quota` changes only the limits given (`none` clears one: no limit of the tenant's own, the
host's still hold) and prints the tenant as `show` does; without a limit given it changes nothing.
Locally or with --url (access.py); `quota` with --url needs an admin key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from browservm.access.principal import validate_tenant
from browservm.access.quotas import Quota
from browservm.cli.access import QUOTA_FIELDS, add_remote_options, as_flags, backend
from browservm.config import Settings
from browservm.errors import InvalidInput
from browservm.templates import CLIPBOARD

_USAGE = {"max_vms": ("vms", "VM(s) live"), "max_mem_mib": ("mem_mib", "MiB in live VMs"),
          "logins_per_hour": ("logins_last_hour", "login(s) in the last hour")}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    add_remote_options(remote)
    parents = [common, remote]
    tenant = commands.add_parser("tenant", help="a tenant's quota and what it uses")
    actions = tenant.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", parents=parents, help="the quota and what the tenant uses now")
    show.add_argument("tenant", metavar="TENANT")
    quota = actions.add_parser("quota", parents=parents, help="change the limits given (`none` clears one)")
    quota.add_argument("tenant", metavar="TENANT")
    for field, what in (("max_vms", "live VMs at once"), ("max_mem_mib", "their memory together, MiB"),
                        ("logins_per_hour", "logins started per hour")):
        quota.add_argument(f"--{field.replace('_', '-')}", dest=field, metavar="N|none", help=what)
    clipboard = actions.add_parser("clipboard", parents=parents,
                                   help="which way its viewers' clipboard may go, over what its templates allow")
    clipboard.add_argument("tenant", metavar="TENANT")
    clipboard.add_argument("clipboard", choices=tuple(CLIPBOARD), help="both, paste (into the VM only), copy (out "
                                                                       "of it only) or none")


def _limit(field: str, value: str) -> int | None:
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(field, value, "must be a whole number, or none for no limit") from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    changes: dict[str, int | None] = {}
    with as_flags():
        validate_tenant(args.tenant, "TENANT")
        if args.action == "quota":
            changes = {field: _limit(field, getattr(args, field)) for field in QUOTA_FIELDS
                       if getattr(args, field) is not None}
            Quota(**changes)  # each limit's range, before anything is asked
    with backend(args, settings) as access:
        if changes:
            current = access.tenant(args.tenant)["quota"]
            quota = Quota(**{**{field: current.get(field) for field in QUOTA_FIELDS}, **changes})
            access.set_quota(args.tenant, quota)
        if args.action == "clipboard":
            access.set_clipboard(args.tenant, args.clipboard)
        shown = access.tenant(args.tenant)
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        _print_tenant(shown)
    return 0


def _print_tenant(view: dict[str, Any]) -> None:
    print(f"tenant {view['tenant']}  (clipboard: {view.get('clipboard', 'both')})")
    quota, usage = view["quota"], view["usage"]
    for field in (f.name for f in dataclasses.fields(Quota)):
        used, what = _USAGE[field]
        limit = quota.get(field)
        print(f"  {field:<16} {'none' if limit is None else limit:<10} ({usage.get(used, 0)} {what})")
