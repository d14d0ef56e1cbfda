"""A cluster from the command line.

    browservm cluster up DIR --address ADDR     the first machine: PostgreSQL (in DIR/postgres, on a
                                                Unix socket and on ADDR), Ray's head, and a front
    browservm cluster front ADDR --state-dir D  another front, anywhere in the cluster
    browservm host join ADDR --name NAME        each host: its Ray node and its agent (the host's
                                                controller, supervised by Ray)
    browservm host drain NAME --url URL         no new VMs there; waits for its VMs to end
    browservm host resume NAME --url URL        new VMs there again
    browservm cluster hosts --url URL           the hosts, as the record has them
    browservm cluster db-up|db-down DIR         the PostgreSQL alone

Secrets stay in files: DIR/cluster.token (the password hosts' agents log in to PostgreSQL with,
copied to each host's state directory) and DIR/api.key (the fronts' operator key).
"""

from __future__ import annotations

import argparse
import importlib
import json
import secrets
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from browservm.cli.client import connect, parse_url
from browservm.client import Client
from browservm.cluster.token import TOKEN_FILE
from browservm.config import Settings, load_settings
from browservm.errors import InvalidInput
from browservm.secretfile import read_or_create

_JOIN_WAIT_S = 300  # an agent's first start may reconcile a host full of VMs
_DRAIN_POLL_S = 2.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cluster = commands.add_parser("cluster", help="several hosts as one: Ray for membership, PostgreSQL as record")
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser("up", help="on the first machine: PostgreSQL, Ray's head, and a front (in the foreground)")
    up.add_argument("directory", metavar="DIR", type=Path, help="the cluster's state: PostgreSQL, keys, token")
    up.add_argument("--address", required=True, metavar="ADDR",
                    help="this machine's address on the cluster's private network (Ray and PostgreSQL listen there)")
    front = actions.add_parser("front", help="another front, on any machine of the cluster (in the foreground)")
    front.add_argument("head", metavar="ADDR", help="the first machine's address (cluster up's --address)")
    front.add_argument("--state-dir", type=Path, required=True, metavar="DIR",
                       help=f"holds copies of cluster up's DIR/{TOKEN_FILE} and DIR/api.key")
    front.add_argument("--node-address", metavar="ADDR",
                       help="this machine's address on the cluster's network, for its Ray node")
    front.add_argument("--ray-running", action="store_true", help="a Ray node of the cluster already runs here")
    for parser in (up, front):
        parser.add_argument("--listen", default="127.0.0.1:8090", metavar="ADDRESS:PORT",
                            help="where the front's API and viewers listen (default 127.0.0.1:8090)")
        parser.add_argument("--public-url", metavar="URL", help="how browsers reach this front, for viewer links")
        parser.add_argument("--grace", type=float, default=120.0, metavar="SECONDS",
                            help="how long a silent host stays suspect before its VMs are lost (default 120)")
    hosts = actions.add_parser("hosts", help="the hosts, with state, capacity, allocated and last heartbeat")
    _add_url(hosts)
    for name, text in (("db-up", "start browservm's PostgreSQL in DIR (made on first use) with its tables"),
                       ("db-down", "stop the PostgreSQL in DIR")):
        action = actions.add_parser(name, help=text)
        action.add_argument("directory", metavar="DIR", type=Path, help="its data, log and Unix socket")
        action.add_argument("--json", action="store_true", help="machine-readable output")


def _add_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, metavar="URL", help="a front of the cluster (cluster up's --listen)")
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="where the front's api.key is (cluster up's DIR)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def add_host_actions(host_commands: argparse._SubParsersAction[argparse.ArgumentParser],
                     common: argparse.ArgumentParser) -> None:
    """`host join` and `host drain`, beside `host up|status|down` (the host's network)."""
    from browservm.cli.serve import add_service_options  # noqa: PLC0415

    join = host_commands.add_parser("join", parents=[common], help="join this host to a cluster: its Ray node and "
                                    "its agent, which runs this host's controller")
    join.add_argument("head", metavar="ADDR", help="the first machine's address (cluster up's --address)")
    join.add_argument("--name", required=True, help="this host's name in the cluster (a DNS label)")
    join.add_argument("--node-address", required=True, metavar="ADDR",
                      help="this host's address on the cluster's network (its Ray node and, by default, its "
                           "controller listen there)")
    join.add_argument("--token-file", type=Path, metavar="FILE",
                      help=f"the cluster's {TOKEN_FILE} (copied into the state directory; default: already there)")
    join.add_argument("--ray-running", action="store_true",
                      help="this host's Ray node is started by you (with the label browservm.host=NAME)")
    join.add_argument("--host-vms", help=argparse.SUPPRESS)  # MODULE:FACTORY: tests' hosts without guests
    add_service_options(join)
    drain = host_commands.add_parser("drain", help="no new VMs on a host; wait until its VMs have ended")
    drain.add_argument("name", metavar="NAME")
    drain.add_argument("--no-wait", action="store_true", help="return once placements there have stopped")
    _add_url(drain)
    resume = host_commands.add_parser("resume", help="a drained host takes new VMs again")
    resume.add_argument("name", metavar="NAME")
    _add_url(resume)


# --- cluster up, hosts, db-up/db-down -------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    if args.action == "hosts":
        with _front(args) as front:
            hosts = [host.as_json() for host in front.hosts()]
        print(json.dumps(hosts, indent=2) if args.json else _hosts_table(hosts))
        return 0
    if args.action == "up":
        return _up(args)
    if args.action == "front":
        return _another_front(args)
    return _db(args)


def _db(args: argparse.Namespace) -> int:
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


def _up(args: argparse.Namespace) -> int:
    from browservm.cluster import ray_node  # noqa: PLC0415
    from browservm.cluster.errors import ClusterError  # noqa: PLC0415
    from browservm.cluster.front_run import run_front  # noqa: PLC0415
    from browservm.cluster.postgres import Postgres  # noqa: PLC0415

    directory: Path = args.directory.absolute()
    directory.mkdir(mode=0o711, parents=True, exist_ok=True)  # PostgreSQL's user passes through to its own
    token = read_or_create(directory / TOKEN_FILE, secrets.token_urlsafe(32), "the cluster's token").strip()
    server = Postgres(directory / "postgres", listen=args.address)
    if server.running():
        if args.address not in server.listening():
            raise ClusterError("start PostgreSQL", f"it already runs in {server.directory} but not on {args.address} "
                               "(started by `cluster db-up`?): stop it (`browservm cluster db-down "
                               f"{server.directory}`) and run `cluster up` again")
        print(f"cluster: PostgreSQL already runs in {server.directory}", flush=True)
    else:
        server.start()
        print(f"cluster: PostgreSQL started in {server.directory}, listening on {args.address}", flush=True)
    server.set_password(token)
    if ray_node.gcs_answers(args.address):
        print(f"cluster: Ray's head already answers on {args.address}:{ray_node.GCS_PORT}", flush=True)
    else:
        ray_node.start_head(args.address)
        print(f"cluster: Ray's head started on {args.address}:{ray_node.GCS_PORT}", flush=True)
    print(f"cluster: on each host, copy {directory / TOKEN_FILE} into its state directory, then run\n"
          f"  browservm host join {args.address} --name NAME --node-address ADDR", flush=True)
    return run_front(server.conninfo, None, args.address, args.listen, directory, grace=args.grace, token=token,
                     public_url=args.public_url)


def _another_front(args: argparse.Namespace) -> int:
    from browservm.api.keys import API_KEY_FILE  # noqa: PLC0415
    from browservm.cluster import ray_node  # noqa: PLC0415
    from browservm.cluster.front_run import run_front  # noqa: PLC0415
    from browservm.cluster.postgres import network_conninfo  # noqa: PLC0415
    from browservm.cluster.token import read_token  # noqa: PLC0415

    directory: Path = args.state_dir.absolute()
    try:
        token = read_token(directory / TOKEN_FILE)
    except FileNotFoundError:
        raise InvalidInput("state_dir", str(directory), f"has no {TOKEN_FILE}: copy cluster up's there") from None
    if not (directory / API_KEY_FILE).exists():  # a key made here would be this front's alone
        raise InvalidInput("state_dir", str(directory), f"has no {API_KEY_FILE}: copy cluster up's there")
    if not args.ray_running:
        if not args.node_address:
            raise InvalidInput("node_address", None, "a front needs a Ray node here: give --node-address "
                                                     "(or --ray-running when one runs already)")
        ray_node.start_node(args.head, args.node_address, None)
    return run_front(network_conninfo(args.head), token, args.head, args.listen, directory, grace=args.grace,
                     token=token, public_url=args.public_url)


# --- host join, host drain -----------------------------------------------------------------------

def run_host(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "drain":
        return _drain(args)
    if args.action == "resume":
        with _front(args) as front:
            host = front.resume_host(args.name)
        print(json.dumps(host.as_json(), indent=2) if args.json else f"host {args.name}: {host.state}, taking new VMs")
        return 0
    return _join(args, settings)


def _join(args: argparse.Namespace, settings: Settings) -> int:
    from browservm.cluster import ray_node  # noqa: PLC0415
    from browservm.cluster.errors import HostError  # noqa: PLC0415
    from browservm.cluster.host_controller import HostController  # noqa: PLC0415
    from browservm.cluster.postgres import network_conninfo  # noqa: PLC0415
    from browservm.cluster.ray_agent import AgentConfig, Agents, start_agent  # noqa: PLC0415
    from browservm.cluster.record import validate_host  # noqa: PLC0415

    name = validate_host(args.name)
    if args.listen is None:  # fronts reach the host's viewer proxy on the cluster's network
        settings = settings.model_copy(update={"listen": f"{args.node_address}:8080"})
    token_path = settings.state_dir / TOKEN_FILE
    if args.token_file is not None:
        text = args.token_file.read_text().strip()
        if not text:
            raise InvalidInput("token_file", str(args.token_file), "is empty")
        token_path.unlink(missing_ok=True)
        read_or_create(token_path, text, "the cluster's token")
    elif not token_path.exists():
        raise InvalidInput("token_file", None, f"no {TOKEN_FILE} in {settings.state_dir}: give the cluster's "
                                               f"(cluster up's DIR/{TOKEN_FILE}) with --token-file")
    vms = _host_vms(args.host_vms) if args.host_vms else HostController.of
    config = AgentConfig(host=name, conninfo=network_conninfo(args.head), password_file=token_path,
                         capacity=settings.max_vms, viewer_address=settings.listen, vms=vms,
                         settings=settings.model_dump(mode="json", exclude={"api_key", "vault_key"}))
    if not args.ray_running:
        ray_node.start_node(args.head, args.node_address, name)
        print(f"host {name}: Ray node started, joined {args.head}:{ray_node.GCS_PORT}", flush=True)
    ray_node.connect(args.head)
    start_agent(config)
    print(f"host {name}: agent started; waiting for it to register (its log is Ray's, on this host)", flush=True)
    agents = Agents()
    deadline = time.monotonic() + _JOIN_WAIT_S
    while True:
        try:
            facts = agents.call(name, "ping", timeout=max(1.0, deadline - time.monotonic()))
            break
        except HostError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)  # Ray is placing or restarting the actor: it has no event to await
    print(f"host {name}: registered (agent epoch {facts['epoch']}, capacity {facts['capacity']}, "
          f"viewer address {settings.listen})", flush=True)
    return 0


def _host_vms(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def _drain(args: argparse.Namespace) -> int:
    with _front(args) as front:
        host = front.drain_host(args.name)
        print(f"host {args.name}: draining; {host.allocated} VM(s) and {host.pending} being placed",
              flush=True)
        while not args.no_wait and host.allocated + host.pending > 0:
            time.sleep(_DRAIN_POLL_S)  # the front has no event for a host's count; its VMs end at users' pace
            now = next((h for h in front.hosts() if h.name == args.name), None)
            if now is None or now.state == "lost":
                print(f"host {args.name}: {now.state_reason if now else 'gone from the record'}", flush=True)
                return 1
            if (now.allocated, now.pending) != (host.allocated, host.pending):
                print(f"host {args.name}: {now.allocated} VM(s) left", flush=True)
            host = now
    if args.json:
        print(json.dumps(host.as_json(), indent=2))
    elif not args.no_wait:
        print(f"host {args.name}: drained, no VMs left", flush=True)
    return 0


def _front(args: argparse.Namespace) -> AbstractContextManager[Client]:
    parse_url(args.url)
    return connect(args.url, load_settings(state_dir=args.state_dir))


def _hosts_table(hosts: list[dict[str, Any]]) -> str:
    lines = [f"{'NAME':<16} {'STATE':<9} {'VMS':>9}  {'HEARTBEAT':<26} REASON"]
    for host in hosts:
        vms = f"{host['allocated'] + host['pending']}/{host['capacity']}"
        lines.append(f"{host['name']:<16} {host['state']:<9} {vms:>9}  {host['heartbeat_at']:<26} "
                     f"{host['state_reason']}")
    return "\n".join(lines)

