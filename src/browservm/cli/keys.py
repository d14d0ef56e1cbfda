"""`browservm key create|list|revoke`: API keys, each with a name, a role and a tenant (access/keys.py).

`key create` prints the key alone on stdout (so `KEY=$(browservm key create ...)` takes it) and, on
stderr, that it is shown only now: the store keeps its SHA-256 digest, never the key. Locally or with
--url (access.py); with --url the CLI's key must be an admin key.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from browservm.access.keys import validate_name
from browservm.access.principal import Role, validate_tenant
from browservm.cli.access import add_remote_options, as_flags, backend, when
from browservm.config import Settings
from browservm.errors import InvalidInput
from browservm.vm.console import terminal_safe


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    add_remote_options(remote)
    parents = [common, remote]
    key = commands.add_parser("key", help="API keys: create (shown once), list, revoke")
    actions = key.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=parents, help="a new key; prints it once, on stdout")
    create.add_argument("--name", required=True, help="what the key is for, for people (1-64 characters)")
    create.add_argument("--role", required=True, choices=[role.value for role in Role],
                        help="admin: everything; tenant: only its tenant's VMs, logins and credentials")
    create.add_argument("--tenant", help="the tenant of a tenant key (1-32 of a-z, 0-9, '-')")
    listing = actions.add_parser("list", parents=parents, help="every key: id, name, role, tenant, created, last "
                                                               "used, revoked")
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = actions.add_parser("revoke", parents=parents, help="refuse the key from its next request on")
    revoke.add_argument("key_id", metavar="KEY_ID", help="its id, as `key list` shows it")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with as_flags():  # every flag checked before the store or the controller is asked
        if args.action in ("create", "list") and args.tenant is not None:
            validate_tenant(args.tenant)
        if args.action == "create":
            validate_name(args.name)
            if args.role == Role.TENANT and args.tenant is None:
                raise InvalidInput("--tenant", None, "a tenant key needs its tenant")
            if args.role == Role.ADMIN and args.tenant is not None:
                raise InvalidInput("--tenant", args.tenant, "an admin key belongs to no tenant: it sees every one")
    if args.action == "revoke" and (not args.key_id.isascii() or not args.key_id.isalnum()
                                    or args.key_id != args.key_id.lower() or len(args.key_id) > 32):
        raise InvalidInput("KEY_ID", args.key_id, "must be 1-32 of a-z and 0-9, as `key list` shows it")
    with backend(args, settings) as access:
        if args.action == "create":
            made = access.create_key(args.name, args.role, args.tenant)
            if args.json:
                print(json.dumps(made, indent=2))
            else:
                print(made["key"], flush=True)
                owner = f" of tenant {made['tenant']}" if made["tenant"] else ""
                print(f"browservm: key {made['key_id']} ({terminal_safe(made['name'])}), role {made['role']}{owner}: "
                      "it is shown only now (the store keeps its digest, never the key); keep it where its "
                      "user will read it", file=sys.stderr)
        elif args.action == "list":
            _print_keys(access.list_keys(args.tenant), args.json)
        else:
            revoked = access.revoke_key(args.key_id)
            if args.json:
                print(json.dumps(revoked, indent=2))
            else:
                print(f"key {revoked['key_id']} ({terminal_safe(revoked['name'])}): revoked at "
                      f"{when(revoked['revoked_at'])}; it is refused from its next request on")
    return 0


def _print_keys(keys: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(keys, indent=2))
        return
    print(f"{'ID':<14} {'NAME':<24} {'ROLE':<7} {'TENANT':<16} {'CREATED':<21} {'LAST USED':<21} REVOKED")
    for key in keys:
        print(f"{key['key_id']:<14} {terminal_safe(key['name'])[:24]:<24} {key['role']:<7} {key['tenant'] or '-':<16} "
              f"{when(key['created_at']):<21} {when(key['last_used_at']):<21} {when(key['revoked_at'])}")
