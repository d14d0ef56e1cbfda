"""A real Ray cluster of simulated hosts on this one machine, each host a network namespace of its own.

    with SimulatedCluster(tmp_path, ["h1", "h2", "h3"], env={"PYTHONPATH": "src"}) as cluster:
        driver = cluster.popen("head", [sys.executable, "driver.py", cluster.address])
        ...
        cluster.kill_host("h2")               # the machine crashed: every process in its namespace SIGKILLed
        cluster.wait_nodes(["h1", "h3"])      # Ray has noticed (~1-2 s with the health checks set below)
        cluster.start_host("h2")              # the machine is back: a new Ray node, same label and address
        cluster.cut("h3"); cluster.mend("h3") # its link down, then up again

Layout (needs root): a head namespace `bvr<pid>-head` holds a bridge with 10.77.0.1/24 and the Ray
head (GCS, no CPUs: nothing is scheduled there). Host i (1-based, in the order given) is namespace
`bvr<pid>-<name>`, whose `eth0` (10.77.0.(10+i)/24) is one end of a veth pair; the other end, `vh<i>`, is a
port of the head's bridge. Each host runs one Ray node with one CPU, labelled `browservm.host=<name>`,
under a UTS namespace whose hostname is the host's name. Nothing is done in the caller's own namespace.

Every process started here (the Ray nodes, `popen`'s) gets `os.environ` updated with `env`. Ray's temp
dirs are under /tmp/bvr<pid>/ (Unix socket paths are limited to 107 bytes); the output of each
`ray start` is in `workdir/logs`, and on exit each node's Ray logs are copied to `workdir/ray-logs`.

On exit, even after a failure or a start-up that failed half way, every process of every namespace made
here is ended by PID (SIGTERM, SIGKILL after 5 s), the namespaces are deleted and /tmp/bvr<pid> removed.
`ray stop` is never used: it stops every Ray process of the machine, other clusters' included.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]

from browservm.hostnet.netns import NETNS_DIR, NetworkNamespace

HEAD = "head"
HEAD_IP = "10.77.0.1"
PREFIX_LEN = 24
RAY_PORT = 6379
HOST_LABEL = "browservm.host"
BRIDGE = "br0"
# The GCS checks each raylet every 0.5 s and gives up after 3 misses: a dead node is noticed in ~1-2 s
# instead of ~13 s (LAB-NOTES.md, "A Ray cluster in network namespaces on one machine").
HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}
TERM_GRACE = 5.0
KILL_DEADLINE = 10.0
_HOST_NAME = re.compile(r"[a-z][a-z0-9-]{0,15}")
_MAX_HOSTS = 200

# Runs under `unshare --uts`: the hostname is set in the new UTS namespace, then the command takes the PID.
_AS_HOST = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"

# Asks the GCS for its nodes until the alive hosts are the ones wanted (or once, when none are given).
# Polling is what the GCS offers a client outside the cluster's drivers; the deadline is the caller's.
_NODES_PROBE = """
import json, sys, time
from ray._raylet import GcsClient
from ray.core.generated.gcs_pb2 import GcsNodeInfo

address, label, want, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
client = GcsClient(address=address)
while True:
    try:
        infos = client.get_all_node_info(timeout=max(1.0, deadline - time.monotonic()))
    except Exception as exc:
        nodes, error = [], f"{type(exc).__name__}: {exc}"
    else:
        error = None
        nodes = [{"node_id": info.node_id.hex(), "address": info.node_manager_address,
                  "hostname": info.node_manager_hostname, "host": info.labels.get(label),
                  "alive": info.state == GcsNodeInfo.GcsNodeState.ALIVE, "head": info.is_head_node}
                 for info in infos.values()]
    alive = sorted(node["host"] for node in nodes if node["alive"] and node["host"] is not None)
    done = error is None and (want is None or alive == want)
    if done or time.monotonic() >= deadline:
        print(json.dumps({"nodes": nodes, "error": error}))
        sys.exit(0 if done else 3)
    time.sleep(0.1)
"""


class SimulatedClusterError(RuntimeError):
    """The simulated cluster could not be made, changed, awaited or cleaned up: `step` says which."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"simulated Ray cluster: {step}: {reason}")


@dataclass(frozen=True)
class RayNode:
    """A node as the GCS records it; `host` is its `browservm.host` label (None for the head's node)."""

    node_id: str
    address: str
    hostname: str
    host: str | None
    alive: bool
    head: bool


@dataclass
class _Host:
    name: str
    index: int
    netns: NetworkNamespace
    temp_dir: Path

    @property
    def address(self) -> str:
        return f"10.77.0.{10 + self.index}"

    @property
    def peer(self) -> str:
        """The veth end on the head's bridge."""
        return f"vh{self.index}"


def _ns_inode(netns: NetworkNamespace) -> tuple[int, int]:
    stat = os.stat(NETNS_DIR / str(netns.name))
    return stat.st_dev, stat.st_ino


def _pids_in(namespaces: Collection[NetworkNamespace]) -> dict[int, NetworkNamespace]:
    """Every live process whose network namespace is one of these (zombies have none and are left out)."""
    wanted = {_ns_inode(ns): ns for ns in namespaces if ns.exists()}
    found: dict[int, NetworkNamespace] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = os.stat(entry / "ns" / "net")
        except OSError:  # gone, or a zombie
            continue
        netns = wanted.get((stat.st_dev, stat.st_ino))
        if netns is not None:
            found[int(entry.name)] = netns
    found.pop(os.getpid(), None)
    return found


def _cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(gone)"


def _comm(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "comm").read_text().strip()
    except OSError:
        return "(gone)"


def _await_exit(pids: Collection[int], deadline: float) -> None:
    """Until each of `pids` has exited or the deadline has passed, woken by their pidfds (no polling)."""
    fds = []
    try:
        for pid in pids:
            try:
                fds.append(os.pidfd_open(pid))
            except ProcessLookupError:
                continue
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        waiting = len(fds)
        while waiting:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            for fd, _event in poller.poll(remaining * 1000):
                poller.unregister(fd)
                waiting -= 1
    finally:
        for fd in fds:
            os.close(fd)


def _signal_all(pids: Collection[int], signum: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            continue


@contextmanager
def _netlink(netns: NetworkNamespace) -> Iterator[Any]:
    """An rtnetlink socket opened inside `netns` (it keeps that namespace wherever it is used)."""
    with netns.entered():
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


class SimulatedCluster:
    """A Ray head and one Ray node per host, each in a network namespace of its own; see the module's doc."""

    def __init__(self, workdir: Path, hosts: list[str], *, env: dict[str, str] | None = None,
                 start_timeout: float = 180.0) -> None:
        if not hosts:
            raise SimulatedClusterError("hosts", "at least one host is needed")
        if len(hosts) > _MAX_HOSTS:
            raise SimulatedClusterError("hosts", f"{len(hosts)} hosts, at most {_MAX_HOSTS}")
        for name in hosts:
            if not _HOST_NAME.fullmatch(name) or name == HEAD:
                raise SimulatedClusterError(
                    "hosts", f"host name {name!r}: must be 1-16 of a-z, 0-9, '-', start with a letter, not {HEAD!r}")
        if len(set(hosts)) != len(hosts):
            raise SimulatedClusterError("hosts", f"host names repeat: {hosts}")
        self.workdir = workdir
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        prefix = f"bvr{os.getpid()}"
        self.temp_root = Path("/tmp") / prefix
        self._head = NetworkNamespace(f"{prefix}-{HEAD}")
        self._head_temp = self.temp_root / HEAD
        self._hosts = {name: _Host(name, i, NetworkNamespace(f"{prefix}-{name}"), self.temp_root / f"n{i}")
                       for i, name in enumerate(hosts, start=1)}
        self._created: list[NetworkNamespace] = []
        self._popens: list[subprocess.Popen[Any]] = []
        self._starts = 0
        self._closed = False

    # --- where things are ------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The GCS's address, for `ray.init(address=...)` and `ray start --address`."""
        return f"{HEAD_IP}:{RAY_PORT}"

    @property
    def hosts(self) -> list[str]:
        return list(self._hosts)

    def host_address(self, name: str) -> str:
        return self._host(name).address

    def namespace(self, where: str) -> NetworkNamespace:
        """The network namespace of a host, or of "head"."""
        return self._head if where == HEAD else self._host(where).netns

    def pids(self, where: str) -> list[int]:
        """The processes running in that namespace now."""
        return sorted(_pids_in([self.namespace(where)]))

    def _host(self, name: str) -> _Host:
        try:
            return self._hosts[name]
        except KeyError:
            raise SimulatedClusterError("host", f"no host {name!r}; hosts are {list(self._hosts)}") from None

    # --- life ------------------------------------------------------------------------------------

    def __enter__(self) -> SimulatedCluster:
        try:
            self._make_network()
            self._start_nodes([HEAD, *self._hosts])
            self.wait_nodes(list(self._hosts), timeout=self.start_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _make_network(self) -> None:
        for netns in [self._head, *(host.netns for host in self._hosts.values())]:
            if not netns.create():
                raise SimulatedClusterError(
                    "create namespace", f"{netns.name} exists already (another SimulatedCluster of this process "
                    "is open, or a crashed run had the same pid); "
                    f"it is not this cluster's to reuse or delete: `ip netns delete {netns.name}`")
            self._created.append(netns)
        with _netlink(self._head) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=BRIDGE, kind="bridge")
            bridge = ipr.link_lookup(ifname=BRIDGE)[0]
            ipr.addr("add", index=bridge, address=HEAD_IP, prefixlen=PREFIX_LEN)
            ipr.link("set", index=bridge, state="up")
            for host in self._hosts.values():
                ipr.link("add", ifname=host.peer, kind="veth", peer={"ifname": "eth0", "net_ns_fd": host.netns.name})
                ipr.link("set", index=ipr.link_lookup(ifname=host.peer)[0], master=bridge, state="up")
        for host in self._hosts.values():
            with _netlink(host.netns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                eth0 = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=eth0, address=host.address, prefixlen=PREFIX_LEN)
                ipr.link("set", index=eth0, state="up")

    def _ray_start_argv(self, where: str) -> list[str]:
        ray = str(Path(sys.prefix) / "bin" / "ray")
        if where == HEAD:
            return [ray, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={RAY_PORT}", "--num-cpus=0",
                    "--include-dashboard=false", f"--temp-dir={self._head_temp}", "--disable-usage-stats"]
        host = self._host(where)
        return [ray, "start", f"--address={self.address}", f"--node-ip-address={host.address}", "--num-cpus=1",
                f"--labels={HOST_LABEL}={host.name}", f"--temp-dir={host.temp_dir}", "--disable-usage-stats"]

    def _start_nodes(self, names: list[str]) -> None:
        """`ray start` for the head (first, alone: the others join it) and the hosts (side by side)."""
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        batches = [[HEAD], [n for n in names if n != HEAD]] if HEAD in names else [names]
        for batch in batches:
            started = []
            for where in batch:
                self._starts += 1
                log_path = logs / f"{self._starts:02d}-{where}-ray-start.log"
                env = HEALTH_CHECKS if where == HEAD else {}
                with log_path.open("wb") as log:
                    proc = self.popen(where, self._ray_start_argv(where), env=env, stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=subprocess.STDOUT)
                started.append((where, proc, log_path))
            deadline = time.monotonic() + self.start_timeout
            for where, proc, log_path in started:
                try:
                    code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise SimulatedClusterError(
                        f"start the Ray node of {where}",
                        f"`ray start` still running after {self.start_timeout:.0f} s; its output: "
                        f"{_tail(log_path)}") from None
                if code != 0:
                    raise SimulatedClusterError(f"start the Ray node of {where}",
                                                f"`ray start` exited {code}; its output: {_tail(log_path)}")

    def popen(self, where: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` in the namespace of `where` (a host: also under its hostname); `close` ends it.
        `env`, if given, is laid over os.environ and the cluster's env."""
        netns = self.namespace(where)
        self._reap()
        env = {**os.environ, **self.env, **(kwargs.pop("env", None) or {})}
        wrapper = [] if where == HEAD else ["unshare", "--uts", "--", sys.executable, "-I", "-S", "-c", _AS_HOST,
                                            where]
        proc = subprocess.Popen(["ip", "netns", "exec", str(netns.name), *wrapper, *argv], env=env, **kwargs)
        self._popens.append(proc)
        return proc

    # --- failures --------------------------------------------------------------------------------

    def kill_host(self, name: str) -> None:
        """SIGKILL every process in the host's namespace, as a crashed machine; returns once they are gone."""
        self._end([self._host(name).netns], grace=0.0)

    def stop_ray(self, name: str) -> None:
        """SIGKILL the host's Ray processes only (those of its node's temp dir), as its supervisor would before
        starting Ray again; its other processes (VMs) run on. Returns once they are gone."""
        host = self._host(name)
        ours = [pid for pid in _pids_in([host.netns]) if str(host.temp_dir) in _cmdline(pid)]
        _signal_all(ours, signal.SIGKILL)
        _await_exit(ours, time.monotonic() + KILL_DEADLINE)

    def start_host(self, name: str) -> None:
        """Start the host's Ray node again: same label, same address, a new node id. Returns once
        `ray start` has; `wait_nodes` says when the GCS counts it alive."""
        host = self._host(name)
        left = [pid for pid in _pids_in([host.netns]) if str(host.temp_dir) in _cmdline(pid)]
        if left:
            raise SimulatedClusterError(
                f"start the Ray node of {name}",
                f"Ray processes of its last node still run (kill_host first; after a cut is mended the raylet "
                f"ends itself but its log monitor stays): "
                f"{[(pid, _cmdline(pid)[:120]) for pid in left]}")
        self._start_nodes([name])

    def cut(self, name: str) -> None:
        """Take the host's link to the others down (its port on the head's bridge): packets are dropped
        both ways, as with a pulled cable; the host's own addresses and routes stay. Once the GCS has
        declared the node dead (~3 s, measured), mending does not bring it back: its raylet learns it was
        declared dead and exits; `kill_host` then `start_host` make a new node."""
        self._set_peer(name, "down")

    def mend(self, name: str) -> None:
        self._set_peer(name, "up")

    def _set_peer(self, name: str, state: str) -> None:
        host = self._host(name)
        with _netlink(self._head) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=host.peer)[0], state=state)

    # --- what Ray says ---------------------------------------------------------------------------

    def nodes(self, timeout: float = 30.0) -> list[RayNode]:
        """Every node the GCS has recorded, dead ones included."""
        return self._probe(None, timeout)

    def wait_nodes(self, alive: Collection[str], timeout: float = 60.0) -> list[RayNode]:
        """Until the hosts with an alive Ray node are exactly `alive` (each once; the head's node aside),
        as the GCS says; the nodes then. After `kill_host("h2")`: `wait_nodes(["h1", "h3"])`."""
        if isinstance(alive, str):
            raise SimulatedClusterError("wait_nodes", f"alive is a collection of host names, not one: [{alive!r}]")
        for name in alive:
            self._host(name)
        return self._probe(sorted(alive), timeout)

    def _probe(self, want: list[str] | None, timeout: float) -> list[RayNode]:
        argv = [sys.executable, "-c", _NODES_PROBE, self.address, HOST_LABEL, json.dumps(want), str(timeout)]
        proc = self.popen(HEAD, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        awaited = "the GCS's node list" if want is None else f"the hosts with an alive Ray node to be {want}"
        try:
            # The probe's own deadline is `timeout`; the margin is its start-up (importing ray).
            out, err = proc.communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SimulatedClusterError(f"wait for {awaited}", f"the probe did not end {timeout + 60:.0f} s") from None
        if proc.returncode not in (0, 3):
            raise SimulatedClusterError(f"wait for {awaited}",
                                        f"the probe exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
        answer = json.loads(out)
        nodes = [RayNode(**node) for node in answer["nodes"]]
        if proc.returncode == 3:
            seen = sorted((n.host or "head", n.address, "alive" if n.alive else "dead") for n in nodes)
            raise SimulatedClusterError(
                f"wait for {awaited}",
                f"not so after {timeout:.0f} s; the GCS has {seen}" + (f" ({answer['error']})" if answer["error"]
                                                                        else ""))
        return nodes

    # --- the end ---------------------------------------------------------------------------------

    def _end(self, namespaces: list[NetworkNamespace], grace: float) -> None:
        """End every process in these namespaces: SIGTERM and `grace` seconds (if any), then SIGKILL until
        none is left (a dying raylet may still start one)."""
        if grace > 0:
            deadline = time.monotonic() + grace
            pids = _pids_in(namespaces)
            # A raylet told to stop while the GCS stops too waits on it past any grace; with the GCS
            # still up, every node's processes end within a second, then the GCS at once.
            last = [pid for pid in pids if _comm(pid) == "gcs_server"]
            for batch in ([pid for pid in pids if pid not in last], last):
                _signal_all(batch, signal.SIGTERM)
                _await_exit(batch, deadline)
        deadline = time.monotonic() + KILL_DEADLINE
        while pids := _pids_in(namespaces):
            if time.monotonic() >= deadline:
                raise SimulatedClusterError(
                    f"end the processes of {[ns.name for ns in namespaces]}",
                    f"still running {KILL_DEADLINE:.0f} s after SIGKILL: "
                    f"{[(pid, _cmdline(pid)[:120]) for pid in pids]}")
            _signal_all(pids, signal.SIGKILL)
            _await_exit(pids, deadline)
        self._reap()

    def _reap(self) -> None:
        """Collect the exit of the processes started here, so none stays a zombie."""
        self._popens = [proc for proc in self._popens if proc.poll() is None]

    def close(self) -> None:
        """End every process, delete the namespaces, remove the temp dirs; idempotent.
        Raises SimulatedClusterError naming what could not be undone (after trying all of it)."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        # A process of popen's that left its namespace (it cannot without root's setns) is still ended.
        strays = [proc.pid for proc in self._popens if proc.poll() is None]
        try:
            self._end(self._created, grace=TERM_GRACE)
        except SimulatedClusterError as exc:
            errors.append(str(exc))
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
        for proc in self._popens:
            try:
                proc.wait(timeout=KILL_DEADLINE)
            except subprocess.TimeoutExpired:
                errors.append(f"process {proc.pid} ({proc.args!r}) did not end")
        self._popens = []
        self._save_ray_logs(errors)
        for netns in reversed(self._created):
            try:
                netns.delete()
            except Exception as exc:  # every namespace is tried; all failures are reported together
                errors.append(f"delete namespace {netns.name}: {exc}")
        self._created = []
        if self.temp_root.exists():
            shutil.rmtree(self.temp_root, onerror=lambda _f, path, exc: errors.append(f"remove {path}: {exc[1]}"))
        if errors:
            raise SimulatedClusterError("clean up", "; ".join(errors))

    def _save_ray_logs(self, errors: list[str]) -> None:
        """Each node's Ray logs into workdir/ray-logs/<where>/<session>, for a failed test's reader."""
        places = [(HEAD, self._head_temp), *((h.name, h.temp_dir) for h in self._hosts.values())]
        for where, temp_dir in places:
            for logs in sorted(temp_dir.glob("session_2*/logs")):
                target = self.workdir / "ray-logs" / where / logs.parent.name
                try:
                    shutil.copytree(logs, target, symlinks=True, ignore=shutil.ignore_patterns("*.sock"))
                except (OSError, shutil.Error) as exc:
                    errors.append(f"copy Ray's logs {logs}: {exc}")

    def __repr__(self) -> str:
        return f"SimulatedCluster({self._head.name}, hosts={list(self._hosts)})"


def _tail(path: Path, size: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError as exc:
        return f"({path} unreadable: {exc.strerror})"
