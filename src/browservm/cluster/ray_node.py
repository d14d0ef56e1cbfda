"""Ray on this machine: the cluster's head (`cluster up`), a host's node (`host join`), and the driver
connection fronts and `host join` talk to agents through.

`ray start` leaves its processes running in the background (Ray's own daemons); browservm never
runs `ray stop`, which stops every Ray process on the machine, not only the ones it started.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import ray

from browservm.cluster.errors import ClusterError
from browservm.cluster.ray_agent import LABEL, NAMESPACE
from browservm.runner import tail

GCS_PORT = 6379
# The GCS checks each node every second and gives it up after 5 misses: a dead host is suspect within
# ~5 s, not Ray's default ~13 s (LAB-NOTES), and a busy node is not taken for dead.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                 "RAY_health_check_failure_threshold": "5"}
_START_TIMEOUT = 180  # seconds for `ray start`: ~7 s on an idle machine, ~30 s on a loaded one (LAB-NOTES)


def _ray() -> str:
    program = Path(sys.executable).with_name("ray")
    if not program.exists():
        raise ClusterError("find Ray", f"{program} is missing: Ray is installed with browservm (scripts/install.sh)")
    return str(program)


def _ray_start(step: str, *args: str, env: dict[str, str] | None = None) -> None:
    argv = [_ray(), "start", *args, "--disable-usage-stats"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_START_TIMEOUT, check=False,
                              stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        raise ClusterError(step, f"`ray start` did not finish in {_START_TIMEOUT} s") from None
    if done.returncode != 0:
        output = tail(done.stdout + done.stderr)
        raise ClusterError(step, f"`{' '.join(argv)}` exited with {done.returncode}:\n{output}")


def gcs_answers(address: str, timeout: float = 2.0) -> bool:
    """Something accepts connections on Ray's GCS port at `address`."""
    try:
        with socket.create_connection((address, GCS_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def start_head(address: str) -> None:
    """The cluster's Ray head on `address`: no CPUs of its own, so no agent lands on it."""
    _ray_start("start Ray's head", "--head", f"--node-ip-address={address}", f"--port={GCS_PORT}", "--num-cpus=0",
               "--include-dashboard=false", env=HEALTH_CHECKS)


def start_node(head: str, node_address: str, host: str | None) -> None:
    """This machine's Ray node. A host's is labelled with its name (its agent is pinned to that label);
    a front's (`host` None) has no label and no CPUs: nothing is placed on it."""
    placement = ("--num-cpus=1", f"--labels={LABEL}={host}") if host else ("--num-cpus=0",)
    _ray_start(f"join Ray's cluster at {head}", f"--address={head}:{GCS_PORT}", f"--node-ip-address={node_address}",
               *placement)


def connect(head: str) -> None:
    """This process as a Ray driver of the cluster at `head` (a Ray node must run on this machine)."""
    if ray.is_initialized():
        return
    try:
        ray.init(address=f"{head}:{GCS_PORT}", namespace=NAMESPACE, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise ClusterError(f"connect to Ray's cluster at {head}:{GCS_PORT}", str(error).strip().splitlines()[0]
                           if str(error).strip() else type(error).__name__) from None
