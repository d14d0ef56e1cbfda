"""A browservm cluster on a SimulatedCluster (raycluster.py), driven as its operator would: `browservm
cluster up` in the head's namespace, `browservm host join` on hosts, the front's API from the head's
namespace. Shared by the cluster tests and the cluster bench.

    with SimulatedCluster(base / "ray", ["h1", "h2"], env=ENV) as sim:
        cluster = RunningCluster(sim, base, grace=20)
        cluster.start_front()
        cluster.join(["h1", "h2"], capacity=120)          # fake VMs (fake_host_vms.py)
        vm = cluster.create("alice")
        ...
        cluster.stop()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from browservm.cluster.postgres import Postgres
from tests.support.raycluster import HEAD, HEAD_IP, SimulatedCluster

REPO = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": f"{REPO / 'src'}:{REPO}", "RAY_DEDUP_LOGS": "0"}  # Ray's workers import tests.support
PORT = 8090
FRONT = f"http://{HEAD_IP}:{PORT}"
BROWSERVM = [sys.executable, "-m", "browservm"]
FAKE_VMS = "tests.support.fake_host_vms:FakeHostVms.of"


class ClusterFailed(AssertionError):
    """A step of the cluster did not do what it must; the message carries the logs that say why."""


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.05) -> Any:
    """Poll `check` until it returns something true: neither the front nor Ray offers an event for a host's
    state or an actor's restart."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise ClusterFailed(f"{what}: not within {timeout:g} s (last seen: {last!r})")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError as error:
        return f"({path} unreadable: {error.strerror})"


class RunningCluster:
    """The front and the hosts' agents on a SimulatedCluster, and an HTTP client of the front per thread."""

    def __init__(self, sim: SimulatedCluster, base: Path, *, grace: float) -> None:
        self.sim = sim
        self.base = base
        self.grace = grace
        self.directory = base / "cluster"
        self.front_log = base / "front.log"
        self.front: subprocess.Popen[bytes] | None = None
        self.key = ""
        self._local = threading.local()
        self._clients: list[httpx.Client] = []
        self._lock = threading.Lock()

    def state_dir(self, host: str) -> Path:
        return self.base / host

    # --- the operator's commands -------------------------------------------------------------------

    def start_front(self) -> None:
        """`cluster up` in the head's namespace (PostgreSQL, and Ray's head already running), until it answers."""
        self._close_clients()  # their connections were to the front before, if any
        with self.front_log.open("ab") as log:
            self.front = self.sim.popen(HEAD, [*BROWSERVM, "cluster", "up", str(self.directory), "--address", HEAD_IP,
                                               "--listen", f"{HEAD_IP}:{PORT}", "--grace", str(self.grace)],
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        wait_for("the front answering /healthz", self._healthy, timeout=180)
        self.key = (self.directory / "api.key").read_text().strip()

    def _healthy(self) -> bool:
        assert self.front is not None
        if self.front.poll() is not None:
            raise ClusterFailed(f"the front exited with {self.front.returncode}: {tail(self.front_log)}")
        try:
            return self.request("GET", "/healthz").status_code == 200
        except httpx.TransportError:
            return False

    def run(self, where: str, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """A `browservm` command in a namespace (a host's, or the head's), its output and status."""
        process = self.sim.popen(where, [*BROWSERVM, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env={**os.environ, **self.sim.env, **(env or {})})
        out, _ = process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(process.args, process.returncode, out, "")

    def join(self, hosts: list[str], *, capacity: int) -> None:
        """`host join` with fake VMs on each host at once; each returns once its agent registered."""
        def one(host: str) -> None:
            state = self.state_dir(host)
            state.mkdir(mode=0o700, exist_ok=True)
            done = self.run(host, "host", "join", HEAD_IP, "--name", host, "--node-address",
                            self.sim.host_address(host), "--ray-running", "--state-dir", str(state),
                            "--token-file", str(self.directory / "cluster.token"), "--host-vms", FAKE_VMS,
                            env={"BROWSERVM_MAX_VMS": str(capacity)}, timeout=360)
            if done.returncode != 0 or f"host {host}: registered" not in done.stdout:
                raise ClusterFailed(f"`host join` of {host} exited {done.returncode}: {done.stdout[-3000:]}")

        with ThreadPoolExecutor(len(hosts)) as pool:
            list(pool.map(one, hosts))

    def stop(self) -> None:
        """The front (SIGTERM, as its operator would), then PostgreSQL; the SimulatedCluster ends the rest."""
        self._close_clients()
        if self.front is not None and self.front.poll() is None:
            self.front.send_signal(signal.SIGTERM)
            try:
                self.front.wait(30)
            except subprocess.TimeoutExpired:
                self.front.kill()
                self.front.wait(10)
        if (self.directory / "postgres").exists():
            Postgres(self.directory / "postgres").stop()

    # --- the front's API ---------------------------------------------------------------------------

    def _close_clients(self) -> None:
        with self._lock:
            for client in self._clients:
                client.close()
            self._clients.clear()
            self._local = threading.local()

    def request(self, method: str, path: str, *, auth: bool = True, **options: Any) -> httpx.Response:
        """From the head's namespace, where the front listens; a keep-alive client per thread."""
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(base_url=FRONT, timeout=90, trust_env=False)
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key and auth else {}
        headers |= options.pop("headers", {})
        # The socket is made in the namespace it is opened in: a reconnect, too, must be made there.
        with self.sim.namespace(HEAD).entered():
            return client.request(method, path, headers=headers, **options)

    def ok(self, method: str, path: str, **options: Any) -> Any:
        response = self.request(method, path, **options)
        if response.status_code >= 300:
            raise ClusterFailed(f"{method} {path}: {response.status_code} {response.text[:500]}; the front's log: "
                                f"{tail(self.front_log)}")
        return response.json()

    def create(self, user: str = "alice", key: str | None = None) -> dict[str, Any]:
        created: dict[str, Any] = self.ok("POST", "/v1/vms", json={"user": user},
                                          headers={"Idempotency-Key": key} if key else {})
        return created

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {host["name"]: host for host in self.ok("GET", "/v1/hosts")}

    def vms(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = self.ok("GET", "/v1/vms")
        return listed

    def delete_all(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda vm: self.ok("DELETE", f"/v1/vms/{vm['vm_id']}"), self.vms()))
        # A row whose end the record missed (it was restarting) ends at its agent's next heartbeat.
        wait_for("no VM left", lambda: self.vms() == [], timeout=30)

    def fake_vms(self, host: str) -> dict[str, int]:
        """The host's VMs as it holds them: VM id -> PID, for those whose process lives."""
        found = {}
        for path in (self.state_dir(host) / "fake-vms").glob("vm-*"):
            pid = int(json.loads(path.read_text())["pid"])
            if Path(f"/proc/{pid}").exists():
                found[path.name] = pid
        return found

    def agent(self, host: str) -> dict[str, Any]:
        """The host's agent, as it answers a ping through Ray (from a driver on the head)."""
        facts = self.agent_if_up(host, unreachable_ok=False)
        assert facts is not None
        return facts

    def agent_if_up(self, host: str, *, unreachable_ok: bool = True) -> dict[str, Any] | None:
        """The same, or None while Ray says the agent is unreachable (one it restarts after a kill)."""
        done = subprocess.run(
            ["ip", "netns", "exec", str(self.sim.namespace(HEAD).name), sys.executable, "-c",
             "import json, sys, ray; from browservm.cluster.ray_agent import Agents, NAMESPACE; "
             f"ray.init(address='{self.sim.address}', namespace=NAMESPACE, log_to_driver=False); "
             "print(json.dumps(Agents().call(sys.argv[1], 'ping', timeout=60)))", host],
            capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **self.sim.env})
        if done.returncode != 0:
            if unreachable_ok and "HostUnreachable" in done.stderr:
                return None
            raise ClusterFailed(f"ping of {host}'s agent: {done.stderr[-2000:]}")
        facts: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return facts
