"""A cluster of three simulated hosts, each a network namespace with its own Ray node, against a real
PostgreSQL and real Ray: `browservm cluster up` in the head's namespace (PostgreSQL listening on the
cluster's address, the front's API), `browservm host join` on each host, and the failures of issue 20
made for real: an agent's process SIGKILLed, a host's every process SIGKILLed, a host's link cut, the
front SIGKILLed mid-create, PostgreSQL stopped.

The hosts' VMs are `sleep` processes (tests/support/fake_host_vms.py): no guests, but processes that are
not the agent's children and die with their host, as VMMs do. The agents, the record, Ray and the front
are the real ones. One cluster for the module; each test leaves it as it found it (all hosts ready, no VM).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from browservm.cluster.postgres import Postgres
from browservm.images.kernel_build import WITH_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from tests.support.browsers import chromium, desktop_colours
from tests.support.cluster import BROWSERVM, ENV, FRONT, RunningCluster, wait_for
from tests.support.raycluster import HEAD, HEAD_IP, SimulatedCluster

from .conftest import TEST_DISK_MIB, Namespaces, vmm_pids_under

pytestmark = pytest.mark.host

HOSTS = ["h1", "h2", "h3"]  # hosts of fake VMs
REAL = "h4"  # a host of real guests, joined by the end-to-end test only
GRACE = 20.0  # the front's: how long a silent host stays suspect before its VMs are lost


@pytest.fixture(scope="module")
def cluster() -> Iterator[RunningCluster]:
    base = Path(tempfile.mkdtemp(prefix="browservm-cluster-"))
    try:
        os.chmod(base, 0o711)  # PostgreSQL's user passes through to its directory
        with SimulatedCluster(base / "ray", [*HOSTS, REAL], env=ENV) as sim:
            made = RunningCluster(sim, base, grace=GRACE)
            try:
                made.start_front()
                made.join(HOSTS, capacity=120)
                yield made
            finally:
                made.stop()
    finally:
        shutil.rmtree(base)


@pytest.fixture
def clean(cluster: RunningCluster) -> Iterator[RunningCluster]:
    yield cluster
    cluster.delete_all()
    wait_for("every host ready", lambda: all(cluster.hosts()[h]["state"] == "ready" for h in HOSTS))


def test_hosts_join_and_the_front_lists_them(clean: RunningCluster) -> None:
    hosts = clean.hosts()
    assert sorted(hosts) == HOSTS
    for host in hosts.values():
        assert (host["state"], host["capacity"], host["allocated"], host["pending"]) == ("ready", 120, 0, 0)
        assert host["viewer_address"].endswith(":8080")
    assert clean.request("GET", "/v1/hosts", auth=False).status_code == 401


def test_300_vms_are_placed_evenly_and_each_runs_on_its_host(clean: RunningCluster) -> None:
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda i: clean.create(f"user{i % 7}"), range(300)))
    assert len({vm["vm_id"] for vm in created}) == 300
    hosts = clean.hosts()
    counts = {name: host["allocated"] for name, host in hosts.items()}
    assert sum(counts.values()) == 300 and all(host["pending"] == 0 for host in hosts.values())
    assert max(counts.values()) / min(counts.values()) <= 1.25, counts  # best of K keeps them near 100 each
    for name in HOSTS:  # the record and each host agree, VM for VM
        on_host = clean.fake_vms(name)
        assert len(on_host) == counts[name]
    assert {vm["state"] for vm in clean.vms()} == {"ready"}  # the list has each host's view of its VMs
    vm = clean.ok("GET", f"/v1/vms/{created[0]['vm_id']}")
    assert vm["placement"] == "running" and vm["state"] == "ready"  # the host's own view, with its placement
    assert vm["vm_id"] in clean.fake_vms(vm["host"])


def test_an_agent_killed_is_restarted_by_ray_and_readopts_its_vms(clean: RunningCluster) -> None:
    created = [clean.create() for _ in range(9)]
    before = clean.agent("h1")
    on_h1 = clean.fake_vms("h1")
    assert on_h1, "best of K put none of 9 VMs on h1"
    os.kill(before["pid"], signal.SIGKILL)
    # While Ray restarts it, a ping may find the actor unreachable: that is not yet an answer.
    after = wait_for("h1's agent restarted",
                     lambda: (a := clean.agent_if_up("h1")) is not None and a["pid"] != before["pid"] and a)
    assert after["epoch"] == before["epoch"] + 1
    assert clean.fake_vms("h1") == on_h1  # the same VMs, the same processes: nothing lost, nothing duplicated
    listed = {vm["vm_id"]: vm for vm in clean.vms()}
    assert sorted(listed) == sorted(vm["vm_id"] for vm in created)
    assert all(vm["placement"] == "running" for vm in listed.values())
    assert clean.hosts()["h1"]["allocated"] == len(on_h1)
    assert clean.create()["host"] in HOSTS  # placements go on


def test_a_crashed_host_is_suspect_at_once_and_its_vms_lost_after_the_grace(clean: RunningCluster) -> None:
    vms = [clean.create() for _ in range(9)]
    on_h3 = [vm["vm_id"] for vm in vms if vm["host"] == "h3"]
    assert on_h3
    clean.sim.kill_host("h3")  # the machine crashed: its VMs with it
    suspect = wait_for("h3 suspect", lambda: (h := clean.hosts()["h3"])["state"] == "suspect" and h, timeout=15)
    assert "Ray node is dead" in suspect["state_reason"]
    assert {clean.create()["host"] for _ in range(6)} <= {"h1", "h2"}  # no placement on a suspect host
    assert clean.ok("GET", f"/v1/vms/{on_h3[0]}")["placement"] == "running"  # within the grace: not lost yet

    lost = wait_for("h3 lost", lambda: (h := clean.hosts()["h3"])["state"] == "lost" and h, timeout=GRACE + 30)
    assert f"past the grace of {GRACE:g} s" in lost["state_reason"] or "grace" in lost["state_reason"]
    for vm_id in on_h3:
        vm = clean.ok("GET", f"/v1/vms/{vm_id}")
        assert vm["placement"] == "lost" and "host h3 lost" in vm["placement_reason"]
        assert vm["state"] == "failed" and vm["failure"]["hop"] == "host"

    clean.sim.start_host("h3")  # the machine is back: Ray restarts its agent on the new node
    wait_for("h3 ready again", lambda: clean.hosts()["h3"]["state"] == "ready", timeout=120)
    assert clean.fake_vms("h3") == {}
    for vm_id in on_h3:  # the lost stay listed, with why, until their user deletes them
        assert clean.ok("GET", f"/v1/vms/{vm_id}")["placement"] == "lost"


def test_a_host_cut_off_and_back_within_the_grace_loses_nothing(clean: RunningCluster) -> None:
    vms = [clean.create() for _ in range(9)]
    on_h2 = clean.fake_vms("h2")
    assert on_h2
    clean.sim.cut("h2")
    wait_for("h2 suspect", lambda: clean.hosts()["h2"]["state"] == "suspect", timeout=15)
    clean.sim.mend("h2")
    # Ray declared its node dead, so its raylet ends itself: the host's supervisor starts a new node.
    clean.sim.stop_ray("h2")
    clean.sim.start_host("h2")
    wait_for("h2 ready again", lambda: clean.hosts()["h2"]["state"] == "ready", timeout=120)
    assert clean.fake_vms("h2") == on_h2  # the same VMs, the same processes
    assert all(vm["placement"] == "running" for vm in clean.vms())
    assert len(clean.vms()) == len(vms)


def test_a_front_killed_mid_create_leaves_nothing_half_made_and_the_key_replays(clean: RunningCluster) -> None:
    for host in HOSTS:  # every host's creates hang until the switch goes
        (clean.state_dir(host) / "fake-vms" / "slow").touch()
    assert clean.front is not None
    posting = ThreadPoolExecutor(1).submit(clean.request, "POST", "/v1/vms", json={"user": "bob"},
                                           headers={"Idempotency-Key": "k-1"})
    wait_for("a reservation pending", lambda: sum(h["pending"] for h in clean.hosts().values()) == 1)
    clean.front.kill()
    clean.front.wait(10)
    for host in HOSTS:
        (clean.state_dir(host) / "fake-vms" / "slow").unlink()
    with pytest.raises(httpx.TransportError):
        posting.result(60)
    clean.start_front()
    replay = clean.create("bob", key="k-1")
    again = clean.create("bob", key="k-1")
    assert replay["vm_id"] == again["vm_id"]
    vm = wait_for("the VM running", lambda: (v := clean.ok("GET", f"/v1/vms/{replay['vm_id']}"))["placement"]
                  == "running" and v)
    assert vm["vm_id"] in clean.fake_vms(vm["host"])
    assert sum(len(clean.fake_vms(host)) for host in HOSTS) == 1  # made once


def test_postgres_stopped_new_creates_get_503_running_vms_carry_on(clean: RunningCluster) -> None:
    vm = clean.create()
    running = {host: clean.fake_vms(host) for host in HOSTS}
    server = Postgres(clean.directory / "postgres", listen=HEAD_IP)
    server.stop()
    try:
        refused = clean.request("POST", "/v1/vms", json={"user": "alice"})
        assert refused.status_code == 503
        assert "cluster's database" in refused.json()["error"]["message"]
        assert {host: clean.fake_vms(host) for host in HOSTS} == running
    finally:
        with clean.sim.namespace(HEAD).entered():
            server.start()
    assert wait_for("creates again", lambda: clean.request("POST", "/v1/vms", json={"user": "alice"}).status_code
                    == 202, timeout=60)
    assert clean.ok("GET", f"/v1/vms/{vm['vm_id']}")["placement"] == "running"
    wait_for("heartbeats again", lambda: all(h["state"] == "ready" for h in clean.hosts().values()))


def test_a_drained_host_takes_no_new_vms_and_drain_waits_for_its_vms(clean: RunningCluster) -> None:
    vms = [clean.create() for _ in range(6)]
    on_h1 = [vm["vm_id"] for vm in vms if vm["host"] == "h1"]
    done = clean.run(HEAD, "host", "drain", "h1", "--url", FRONT, "--state-dir", str(clean.directory),
                     "--no-wait")
    assert done.returncode == 0, done.stdout
    assert clean.hosts()["h1"]["state"] == "draining"
    assert {clean.create()["host"] for _ in range(6)} <= {"h2", "h3"}
    waiting = clean.sim.popen(HEAD, [*BROWSERVM, "host", "drain", "h1", "--url", FRONT, "--state-dir",
                                     str(clean.directory)], stdout=subprocess.PIPE, text=True)
    for vm_id in on_h1:
        clean.ok("DELETE", f"/v1/vms/{vm_id}")
    out, _ = waiting.communicate(timeout=60)
    assert waiting.returncode == 0 and "drained, no VMs left" in out, out
    clean.sim.kill_host("h1")  # an operator's drain outlives the host's agent and node
    clean.sim.start_host("h1")
    wait_for("h1's agent back", lambda: (a := clean.agent_if_up("h1")) is not None and a["epoch"] > 0, timeout=120)
    assert clean.hosts()["h1"]["state"] == "draining"
    done = clean.run(HEAD, "host", "resume", "h1", "--url", FRONT, "--state-dir", str(clean.directory))
    assert done.returncode == 0 and "taking new VMs" in done.stdout, done.stdout
    assert "h1" in {clean.create()["host"] for _ in range(12)}




@pytest.mark.vm
def test_a_desktop_created_through_one_front_is_seen_through_another(
        cluster: RunningCluster, namespaces: Namespaces, built: dict[str, BuiltKernel],
        full_image: RootfsImage) -> None:
    """The path of a person on a cluster: a real guest on the real host h4 (its controller run by its agent),
    created with `vm create --url` on the first front, its desktop opened in Chromium through a second front on
    another machine (h2), then deleted while viewed: the host's close code reaches the page through the relay,
    and the same link opened again is refused by the front, which no longer routes it."""
    state = cluster.state_dir(REAL)
    state.mkdir(mode=0o700)
    front2_dir = cluster.base / "front2"
    front2_dir.mkdir(mode=0o700)
    for name in ("cluster.token", "api.key"):  # what an operator copies to another front's machine
        (front2_dir / name).write_text((cluster.directory / name).read_text())
        (front2_dir / name).chmod(0o600)
    drained = []
    front2 = None
    try:
        for host in HOSTS:  # the guest must land on h4
            cluster.ok("POST", f"/v1/hosts/{host}/drain")
            drained.append(host)
        done = cluster.run(REAL, "host", "join", HEAD_IP, "--name", REAL, "--node-address",
                           cluster.sim.host_address(REAL), "--ray-running", "--state-dir", str(state),
                           "--token-file", str(cluster.directory / "cluster.token"), "--netns", namespaces.name("vms"),
                           "--kernel", str(built[WITH_IP_PNP.name].vmlinux), "--rootfs", str(full_image.path),
                           "--vmm", "qemu", env={"BROWSERVM_DISK_MIB": str(TEST_DISK_MIB)})
        assert done.returncode == 0 and f"host {REAL}: registered" in done.stdout, done.stdout

        created = cluster.run(HEAD, "vm", "create", "--url", FRONT, "--state-dir", str(cluster.directory),
                              "--user", "e2e", "--json", timeout=600)
        assert created.returncode == 0, created.stdout[-3000:]
        vm = json.loads(created.stdout[created.stdout.index("\n{") + 1:])  # after the progress lines
        assert vm["state"] == "ready" and vm["host"] == REAL, vm
        assert vm["viewer"]["url"].startswith(f"{FRONT}/view/{vm['vm_id']}?token=")

        second = f"http://{cluster.sim.host_address('h2')}:8091"
        log = (cluster.base / "front2.log").open("w")
        front2 = cluster.sim.popen("h2", [*BROWSERVM, "cluster", "front", HEAD_IP, "--state-dir", str(front2_dir),
                                          "--ray-running", "--listen", f"{cluster.sim.host_address('h2')}:8091"],
                                   stdout=log, stderr=subprocess.STDOUT)
        log.close()

        def second_answers() -> bool:
            try:
                with cluster.sim.namespace(HEAD).entered(), httpx.Client(timeout=5, trust_env=False) as client:
                    return client.get(f"{second}/healthz").status_code == 200
            except httpx.TransportError:
                assert front2 is not None and front2.poll() is None, (cluster.base / "front2.log").read_text()
                return False

        wait_for("the second front answering", second_answers, timeout=120)
        with cluster.sim.namespace(HEAD).entered(), httpx.Client(
                base_url=second, timeout=60, trust_env=False,
                headers={"Authorization": f"Bearer {cluster.key}"}) as client:
            link = client.post(f"/v1/vms/{vm['vm_id']}/viewer")
            console = client.get(f"/v1/vms/{vm['vm_id']}/console", params={"lines": 5})
        assert link.status_code == 200, link.text
        assert console.status_code == 200 and len(console.json()["lines"]) == 5, console.text  # from h4
        url = link.json()["url"]
        assert url.startswith(f"{second}/view/{vm['vm_id']}?token=")

        with cluster.sim.namespace(HEAD).entered(), chromium() as browser:  # Chromium on the cluster's network
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#status[data-state='connected']", timeout=120_000)
            colours = desktop_colours(page)
            assert colours >= 16, f"the canvas shows {colours} colour(s): no browser window on the desktop"
            # The open page's next link comes through this front too (issue 22), signed by the VM's host.
            renewed = page.evaluate("""async ([vm, token]) => {
                const r = await fetch(`/view/${vm}/token`, {method: "POST", body: JSON.stringify({token}),
                                                          headers: {"Content-Type": "application/json"}});
                return [r.status, await r.json()]; }""", [vm["vm_id"], url.split("token=")[1]])
            assert renewed[0] == 200 and renewed[1]["url"].startswith(f"{second}/view/{vm['vm_id']}?token="), renewed

            operator = browser.new_page()  # the operator's page on the first front: the VM and its host
            operator.goto(f"{FRONT}/")
            operator.fill("input[name=key]", cluster.key)
            operator.click("button[type=submit]")
            row = f"tr[data-vm-id='{vm['vm_id']}']"
            operator.wait_for_selector(row, timeout=30_000)
            assert operator.inner_text(f"{row} td.host") == REAL and "ready" in operator.inner_text(row)

            cluster.ok("DELETE", f"/v1/vms/{vm['vm_id']}")  # through the first front, while viewed through the second
            page.wait_for_selector("#status[data-state='closed']", timeout=60_000)
            code = page.eval_on_selector("#status", "s => s.dataset.closeCode")
            assert code == "4410", code  # the host's own code, through the relay
            wait_for("the VM's row gone", lambda: cluster.vms() == [], timeout=30)
            page.goto(url)
            page.wait_for_function("document.querySelector('#status').dataset.closeCode", timeout=60_000)
            text = page.eval_on_selector("#status", "s => s.dataset.closeCode + ' ' + s.textContent")
            assert text.startswith("4404"), text  # the front routes it nowhere: refused, no VM reached
    finally:
        if front2 is not None and front2.poll() is None:
            front2.send_signal(signal.SIGTERM)
            front2.wait(30)
        for host in drained:
            cluster.ok("POST", f"/v1/hosts/{host}/resume")
        for vm in cluster.vms():
            cluster.request("DELETE", f"/v1/vms/{vm['vm_id']}")
        cluster.sim.kill_host(REAL)  # its agent and controller; then what they left in the VM network
        for pid in vmm_pids_under(state):
            os.kill(pid, signal.SIGKILL)
