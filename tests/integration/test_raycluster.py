"""What the cluster tests rely on from tests/support/raycluster.py, against a real Ray cluster:
actors pinned by label run in their host's namespace under its hostname, a killed host's node is
reported dead while the others stay, a restarted host's pinned detached actor answers again, and
nothing of the cluster is left once its context has exited."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.raycluster import HEAD, SimulatedCluster

pytestmark = pytest.mark.host

# A driver in the head's namespace: for each host named, its detached actor (created if asked) says
# where it runs. max_restarts=-1: Ray starts it again once its host's node is back.
DRIVER = """
import json, os, socket, sys
import fcntl, struct
import ray

address, hosts, create = sys.argv[1], sys.argv[2].split(","), sys.argv[3] == "create"
ray.init(address=address, namespace="raycluster-test", logging_level="WARNING")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class Where:
    def where(self):
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        siocgifaddr = 0x8915
        packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", b"eth0"))
        return {"hostname": socket.gethostname(), "eth0": socket.inet_ntoa(packed[20:24]),
                "netns": os.stat("/proc/self/ns/net").st_ino, "pid": os.getpid(),
                "node_id": ray.get_runtime_context().get_node_id()}


answers = {}
for name in hosts:
    if create:
        actor = Where.options(name=f"where-{name}", lifetime="detached",
                              label_selector={"browservm.host": name}).remote()
    else:
        actor = ray.get_actor(f"where-{name}")
    answers[name] = ray.get(actor.where.remote(), timeout=60)
print(json.dumps(answers))
"""


def ask(cluster: SimulatedCluster, hosts: list[str], mode: str) -> dict[str, dict[str, Any]]:
    driver = cluster.popen(HEAD, [sys.executable, "-c", DRIVER, cluster.address, ",".join(hosts), mode],
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 0, f"the driver failed: {err[-3000:]}"
    answers: dict[str, dict[str, Any]] = json.loads(out.strip().splitlines()[-1])
    return answers


def netns_inode(cluster: SimulatedCluster, where: str) -> int:
    return os.stat(f"/run/netns/{cluster.namespace(where).name}").st_ino


def processes_in(inodes: set[tuple[int, int]]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = os.stat(entry / "ns" / "net")
            except OSError:
                continue
            if (stat.st_dev, stat.st_ino) in inodes:
                found.append(int(entry.name))
    return found


def test_a_simulated_cluster_pins_loses_restarts_and_leaves_nothing(tmp_path: Path) -> None:
    hosts = ["h1", "h2"]
    with SimulatedCluster(tmp_path, hosts) as cluster:
        names = [str(cluster.namespace(where).name) for where in [HEAD, *hosts]]
        inodes = {(os.stat(f"/run/netns/{n}").st_dev, os.stat(f"/run/netns/{n}").st_ino) for n in names}
        temp_root = cluster.temp_root
        nodes = {node.host: node for node in cluster.nodes() if node.alive}
        for name in hosts:
            assert nodes[name].address == cluster.host_address(name)
            assert nodes[name].hostname == name

        first = ask(cluster, hosts, "create")
        for name in hosts:
            assert first[name]["hostname"] == name
            assert first[name]["eth0"] == cluster.host_address(name)
            assert first[name]["netns"] == netns_inode(cluster, name)
            assert first[name]["node_id"] == nodes[name].node_id

        cluster.kill_host("h2")
        assert cluster.pids("h2") == []
        after_kill = {node.node_id: node for node in cluster.wait_nodes(["h1"], timeout=30)}
        assert not after_kill[nodes["h2"].node_id].alive
        assert after_kill[nodes["h1"].node_id].alive

        cluster.start_host("h2")
        cluster.wait_nodes(hosts, timeout=60)
        again = ask(cluster, ["h2"], "get")["h2"]
        assert again["node_id"] != nodes["h2"].node_id
        assert again["pid"] != first["h2"]["pid"]
        assert (again["hostname"], again["eth0"], again["netns"]) == ("h2", "10.77.0.12", first["h2"]["netns"])

    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert not [n for n in names if n in listed.split()], listed
    assert processes_in(inodes) == []
    assert not temp_root.exists()
    assert (tmp_path / "ray-logs" / "h2").is_dir()  # both of h2's sessions, for a failed test's reader
