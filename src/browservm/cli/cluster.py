"""`browservm cluster db-up|db-down DIR`: the cluster's PostgreSQL, by hand, until `cluster up` exists."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser("cluster", help="a cluster's record in PostgreSQL (issue 20: in progress)")
    actions = cluster.add_subparsers(dest="action", required=True)
    for name, text in (("db-up", "start browservm's PostgreSQL in DIR (made on first use) with its tables"),
                       ("db-down", "stop the PostgreSQL in DIR")):
        action = actions.add_parser(name, help=text)
        action.add_argument("directory", metavar="DIR", type=Path, help="its data, log and Unix socket")
        action.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    # Imported here: every other command would otherwise pay psycopg's import (~0.1 s) at start.
    from browservm.cluster.postgres import Postgres  # noqa: PLC0415
    from browservm.cluster.record import Record  # noqa: PLC0415
    from browservm.cluster.schema import MIGRATIONS  # noqa: PLC0415

    server = Postgres(args.directory)
    if args.action == "db-up":
        server.start()
        with Record(server.conninfo):  # brings the tables up to date
            pass
        facts = {"directory": str(server.directory), "conninfo": server.conninfo, "schema": len(MIGRATIONS)}
        print(json.dumps(facts, indent=2) if args.json else f"PostgreSQL running in {server.directory}; "
              f"connect with: {server.conninfo}")
    else:
        was_running = server.running()
        server.stop()
        print(json.dumps({"directory": str(server.directory), "stopped": was_running}, indent=2) if args.json
              else f"PostgreSQL in {server.directory} {'stopped' if was_running else 'was not running'}")
    return 0
