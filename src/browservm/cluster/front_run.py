"""Running a front in this process: the record, the Ray driver, the HTTP API on uvicorn until SIGTERM/Ctrl-C."""

from __future__ import annotations

from pathlib import Path

import ray
import uvicorn

from browservm.api.keys import api_key
from browservm.api.logs import configure as configure_logs
from browservm.api.proxy import UVICORN_WEBSOCKETS
from browservm.cluster import ray_node
from browservm.cluster.front import DEFAULT_SILENCE, Front
from browservm.cluster.front_app import Relay, build_front_app
from browservm.cluster.ray_agent import Agents
from browservm.cluster.record import Record
from browservm.cluster.routes import RouteCache
from browservm.cluster.token import host_api_key
from browservm.errors import InvalidInput


def run_front(conninfo: str, password: str | None, head: str, listen: str, state_dir: Path, *,
              grace: float, token: str, public_url: str | None) -> int:
    """`password`: PostgreSQL's, when `conninfo` is over the network (None on the server's own socket)."""
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidInput("listen", listen, "must be ADDRESS:PORT, for example 127.0.0.1:8090")
    if not DEFAULT_SILENCE <= grace <= 86400:
        raise InvalidInput("grace", grace, f"must be between {DEFAULT_SILENCE} and 86400 seconds")
    configure_logs("text")  # also keeps httpx from logging the URLs it relays (a viewer's token among them)
    key, key_file = api_key(state_dir)
    ray_node.connect(head)
    try:
        with Record(conninfo, password=password) as record:
            front = Front(record, Agents(), ray.nodes, grace=grace)
            routes = RouteCache(conninfo, record.route, password=password)
            routes.start()
            relay = Relay(host_api_key(token), routes, (public_url or f"http://{listen}").rstrip("/"))
            print(f"front: listening on http://{listen}; API key in {key_file or 'the settings'}; "
                  f"hosts: browservm cluster hosts --url http://{listen} --state-dir {state_dir}", flush=True)
            config = uvicorn.Config(build_front_app(front, key, relay), host=host.strip("[]"), port=int(port),
                                    lifespan="on", log_level="warning", access_log=False,
                                    timeout_graceful_shutdown=10, **UVICORN_WEBSOCKETS)
            try:
                uvicorn.Server(config).run()
            finally:
                routes.close()
    finally:
        ray.shutdown()
    print("front: stopped; hosts and their VMs run on", flush=True)
    return 0
