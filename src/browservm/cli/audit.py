"""`browservm audit [--since WHEN] [--tenant T] [--vm ID] [--after N] [--limit N]`: the audit trail,
oldest first (access/audit.py): when, which key (its id, never the key), which tenant, what, on
what, the outcome. A page holds --limit entries; when there are more, stderr says the --after that
reads the next. Locally or with --url (access.py); a tenant key reads its own tenant's entries only.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from browservm.access.audit import MAX_QUERY
from browservm.access.principal import validate_tenant
from browservm.cli.access import add_remote_options, as_flags, backend, parse_since, when
from browservm.config import Settings
from browservm.errors import InvalidInput
from browservm.ids import validate_vm_id
from browservm.vm.console import terminal_safe


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    audit = commands.add_parser("audit", parents=[common], help="the audit trail: who changed what, when, "
                                                                "with what outcome")
    add_remote_options(audit)
    audit.add_argument("--since", metavar="WHEN", default="0",
                       help="from this time: ago (30m, 2h, 7d), a date or time (2026-12-07, 2026-12-07T09:00Z; "
                            "UTC unless it has an offset) or unix seconds (default: the whole trail)")
    audit.add_argument("--tenant", help="only this tenant's entries")
    audit.add_argument("--vm", dest="vm_id", metavar="VM_ID", help="only the entries on this VM")
    audit.add_argument("--after", type=int, default=0, metavar="N", help="after entry N (the next page)")
    audit.add_argument("--limit", type=int, default=100, metavar="N", help=f"entries at most (1-{MAX_QUERY}, "
                                                                           "default 100)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with as_flags():
        since = parse_since(args.since)
        if args.tenant is not None:
            validate_tenant(args.tenant)
        if args.vm_id is not None:
            try:
                validate_vm_id(args.vm_id)
            except InvalidInput as exc:
                raise InvalidInput("--vm", args.vm_id, exc.reason) from None
        if not 1 <= args.limit <= MAX_QUERY:
            raise InvalidInput("limit", args.limit, f"must be from 1 to {MAX_QUERY}")
        if args.after < 0:
            raise InvalidInput("after", args.after, "must be an entry's id, 0 or more")
    with backend(args, settings) as access:
        page = access.audit(since, args.tenant, args.vm_id, args.after, args.limit)
    if args.json:
        print(json.dumps(page, indent=2))
    else:
        _print_entries(page["entries"])
    if page.get("next") is not None:
        print(f"browservm: more entries: add --after {page['next']}", file=sys.stderr)
    return 0


def _print_entries(entries: list[dict[str, Any]]) -> None:
    print(f"{'ID':<7} {'TIME':<21} {'KEY':<14} {'TENANT':<16} {'ACTION':<28} {'TARGET':<20} {'OUTCOME':<9} DETAIL")
    for e in entries:
        print(f"{e['id']:<7} {when(e['at']):<21} {e['key_id'] or '-':<14} {e['tenant'] or '-':<16} "
              f"{terminal_safe(e['action']):<28} {terminal_safe(e['target']) or '-':<20} "
              f"{terminal_safe(e['outcome']):<9} {terminal_safe(e.get('detail') or '')}")
