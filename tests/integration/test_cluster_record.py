"""The cluster's record (browservm.cluster) against a real PostgreSQL 15.

One server for the whole module, on a Unix socket only, stopped at the end even after a failure;
each test gets a database of its own in it. The server's directory is made under /tmp rather than
pytest's tmp_path: under root PostgreSQL runs as `postgres`, which cannot enter pytest's 0700
/tmp/pytest-of-root.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from browservm.cli import main
from browservm.cluster.errors import (
    FencedOut,
    HostRefused,
    NoCapacity,
    PostgresError,
    RecordConflict,
    RecordUnavailable,
)
from browservm.cluster.postgres import Postgres, running
from browservm.cluster.record import Record, Vm
from browservm.cluster.routes import RouteCache
from browservm.errors import InvalidInput, VmNotFound

_databases = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    base = Path(tempfile.mkdtemp(prefix="browservm-cluster-test-"))
    try:
        os.chmod(base, 0o711)  # the server's user may pass through, not list
        with running(base / "postgres", durable=False) as postgres:
            yield postgres
        assert not postgres.socket.exists(), "the socket outlived the server"
    finally:
        shutil.rmtree(base)


@pytest.fixture
def conninfo(server: Postgres) -> Iterator[str]:
    name = f"test_{os.getpid()}_{next(_databases)}"
    with psycopg.connect(server.conninfo, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield psycopg.conninfo.make_conninfo(server.conninfo, dbname=name)
    finally:  # a connection of its own: a test may have restarted the server meanwhile
        with psycopg.connect(server.conninfo, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def record(conninfo: str, clock: Clock) -> Iterator[Record]:
    with Record(conninfo, clock=clock, rng=random.Random(20)) as opened:
        yield opened


class Agents:
    """Hosts' agents as far as the record sees them: registered with an epoch, confirming what they are given."""

    def __init__(self, record: Record) -> None:
        self.record = record
        self.epochs: dict[str, int] = {}
        self.refusing: set[str] = set()
        self.asked: list[str] = []

    def register(self, host: str, capacity: int) -> int:
        self.epochs[host] = self.record.register(host, capacity=capacity, viewer_address=f"{host}.test:8443")
        return self.epochs[host]

    def start(self, vm: Vm) -> Vm:
        """As an agent: the VM made under an id of the host's own, and confirmed under it."""
        self.asked.append(vm.host)
        if vm.host in self.refusing:
            raise HostRefused(vm.host, "full by its own count")
        return self.record.confirm(vm.host, self.epochs[vm.host], vm.vm_id, f"on-{vm.vm_id}")


def reserve_only(vm: Vm) -> Vm:
    """A start that leaves the VM reserved (its agent has not confirmed it yet)."""
    return vm


def allocated(record: Record) -> dict[str, int]:
    return {host.name: host.allocated for host in record.hosts()}


def test_the_server_is_reachable_only_through_its_socket(server: Postgres) -> None:
    with psycopg.connect(server.conninfo) as connection:
        row = connection.execute("SHOW listen_addresses").fetchone()
    assert row == ("",)
    assert server.socket.is_socket()
    assert server.directory.stat().st_mode & 0o777 == 0o700


def test_a_second_start_on_a_running_directory_is_refused_naming_the_fix(server: Postgres) -> None:
    with pytest.raises(PostgresError) as refused:
        Postgres(server.directory, durable=False).start()
    assert "already runs" in str(refused.value) and "pg_ctl stop" in str(refused.value)


def test_missing_binaries_name_the_package(tmp_path: Path) -> None:
    with pytest.raises(PostgresError) as refused:
        Postgres(tmp_path / "pg", binaries=tmp_path / "nowhere").start()
    assert "postgresql-15" in str(refused.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root the server runs as `postgres`, whose reach is tested")
def test_a_directory_the_servers_user_cannot_reach_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(PostgresError) as refused:
        Postgres(tmp_path / "pg").start()  # pytest's tmp_path is under a 0700 directory of root's
    assert "cannot enter /tmp/pytest-of-root (mode 700)" in str(refused.value)
    assert not (tmp_path / "pg").exists()


def test_an_old_agent_is_fenced_out_once_a_new_one_registered(record: Record) -> None:
    agents = Agents(record)
    first = agents.register("h1", 10)
    record.heartbeat("h1", first)
    vm = record.create("alice", reserve_only)  # reserved, not yet confirmed

    second = agents.register("h1", 10)  # the agent restarted
    assert second > first
    with pytest.raises(FencedOut) as fenced:
        record.heartbeat("h1", first)
    assert (fenced.value.epoch, fenced.value.current) == (first, second)
    with pytest.raises(FencedOut):
        record.confirm("h1", first, vm.vm_id, "vm-on-h1")
    assert record.vm(vm.vm_id).state == "pending"  # the refused write changed nothing

    assert record.confirm("h1", second, vm.vm_id, "vm-on-h1").state == "running"
    with pytest.raises(FencedOut) as unknown:
        record.heartbeat("h9", 1)
    assert unknown.value.current is None


def test_300_vms_spread_evenly_over_3_hosts(record: Record) -> None:
    agents = Agents(record)
    for host in ("h1", "h2", "h3"):
        agents.register(host, 150)
    for _ in range(300):
        record.create("alice", agents.start)
    counts = allocated(record)
    assert sum(counts.values()) == 300
    assert max(counts.values()) / min(counts.values()) <= 1.1, counts
    assert all(host.pending == 0 and host.allocated <= host.capacity for host in record.hosts())


def test_fronts_racing_for_the_last_slots_never_overfill_a_host(record: Record, conninfo: str) -> None:
    agents = Agents(record)
    capacities = {"h1": 5, "h2": 7, "h3": 8}
    for host, capacity in capacities.items():
        agents.register(host, capacity)
    fronts = [Record(conninfo, rng=random.Random(seed)) for seed in range(6)]
    placed: list[Vm] = []
    refused: list[NoCapacity] = []
    lock = threading.Lock()
    start_together = threading.Barrier(len(fronts))

    def front(front_record: Record) -> None:
        start_together.wait()
        for _ in range(10):
            try:
                vm = front_record.create("alice", reserve_only)
            except NoCapacity as error:
                with lock:
                    refused.append(error)
            else:
                with lock:
                    placed.append(vm)

    threads = [threading.Thread(target=front, args=(f,)) for f in fronts]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for f in fronts:
            f.close()
    assert len(placed) == sum(capacities.values()) and len(refused) == 60 - len(placed)
    assert len({vm.vm_id for vm in placed}) == len(placed)
    for row in record.hosts():
        assert row.pending == capacities[row.name], row
        assert sum(1 for vm in placed if vm.host == row.name) == row.pending


def test_a_refusing_host_is_skipped_and_three_refusals_end_in_no_capacity(record: Record) -> None:
    agents = Agents(record)
    for host in ("h1", "h2", "h3", "h4"):
        agents.register(host, 10)
    agents.refusing = {"h1"}
    for _ in range(8):
        assert record.create("alice", agents.start).host != "h1"
    assert allocated(record)["h1"] == 0

    agents.refusing = {"h1", "h2", "h3", "h4"}
    agents.asked.clear()
    with pytest.raises(NoCapacity) as none:
        record.create("alice", agents.start)
    assert len(agents.asked) == 3 and len(set(agents.asked)) == 3  # three different hosts, then it stops
    assert sum("refused" in reason for reason in none.value.reasons) == 3
    assert "gave up after 3 tries" in str(none.value)
    assert all(host.pending == 0 for host in record.hosts())  # every refused reservation released


def test_no_ready_host_says_why(record: Record) -> None:
    with pytest.raises(NoCapacity) as none:
        record.create("alice", reserve_only)
    assert "no host is registered" in str(none.value)

    agents = Agents(record)
    agents.register("h1", 1)
    agents.register("h2", 5)
    record.create("alice", agents.start)
    record.drain("h2")
    with pytest.raises(NoCapacity) as full:
        record.create("alice", agents.start)
    assert "no ready host with room (1 ready, 1 draining; ready hosts have 1 of 1 slots taken)" in str(full.value)


def test_a_failed_create_leaves_nothing_behind(record: Record) -> None:
    Agents(record).register("h1", 10)
    failed: list[Vm] = []

    def broken(vm: Vm) -> Vm:
        failed.append(vm)
        raise OSError("the agent's connection dropped")

    with pytest.raises(OSError, match="connection dropped"):
        record.create("alice", broken, idempotency_key="k1")
    assert record.hosts()[0].pending == 0
    with pytest.raises(VmNotFound):
        record.vm(failed[0].vm_id)
    retried = record.create("alice", reserve_only, idempotency_key="k1")
    assert retried.vm_id != failed[0].vm_id  # the key is free again: the retry makes the VM anew


def test_a_replayed_create_returns_the_same_vm_also_while_the_first_is_in_flight(record: Record,
                                                                                   conninfo: str) -> None:
    agents = Agents(record)
    agents.register("h1", 10)
    agents.register("h2", 10)
    in_flight = threading.Event()
    finish = threading.Event()
    first: list[Vm] = []

    def slow_start(vm: Vm) -> Vm:
        in_flight.set()
        assert finish.wait(30)
        return agents.start(vm)

    def never(vm: Vm) -> Vm:
        raise AssertionError("a replay must not make a second VM")

    with Record(conninfo) as front:
        creating = threading.Thread(target=lambda: first.append(front.create("alice", slow_start,
                                                                             idempotency_key="key-1")))
        creating.start()
        try:
            assert in_flight.wait(30)
            replay = record.create("alice", never, idempotency_key="key-1")
        finally:
            finish.set()
            creating.join()
    assert replay.state == "pending" and first[0].state == "running"
    assert first[0].reserved_as == replay.vm_id  # the host named it; the reservation's id still finds it
    assert record.vm(replay.vm_id) == first[0]
    after = record.create("alice", never, idempotency_key="key-1")
    assert (after.vm_id, after.state) == (first[0].vm_id, "running")
    other_user = record.create("bob", agents.start, idempotency_key="key-1")
    assert other_user.vm_id != replay.vm_id  # a key is one user's; another's replay never reaches this VM
    assert sum(host.allocated for host in record.hosts()) == 2


def test_a_host_is_suspect_at_once_and_lost_only_after_the_grace(record: Record, clock: Clock) -> None:
    agents = Agents(record)
    e1 = agents.register("h1", 10)
    e2 = agents.register("h2", 10)
    vm = record.create("alice", agents.start)
    while vm.host != "h1":
        vm = record.create("alice", agents.start)

    assert record.mark_suspect("h1", "its Ray node died")  # no placements there from now on
    assert {record.create("alice", agents.start).host for _ in range(5)} == {"h2"}

    clock.advance(100)
    record.heartbeat("h2", e2)
    assert record.sweep(silence=10, grace=120) == []  # within the grace: nothing lost
    assert record.vm(vm.vm_id).state == "running"
    record.heartbeat("h1", e1)  # a late heartbeat of the agent on the dead node proves nothing
    assert record.host("h1").state == "suspect"
    e1 = agents.register("h1", 10)  # it came back: a new node, its agent restarted by Ray
    assert {h.name: h.state for h in record.hosts()} == {"h1": "ready", "h2": "ready"}
    record.sweep(silence=10, grace=120)
    record.heartbeat("h1", e1)

    clock.advance(30)
    record.sweep(silence=10, grace=120)
    assert {h.name: h.state for h in record.hosts()} == {"h1": "suspect", "h2": "suspect"}  # silent past 10 s
    record.heartbeat("h2", e2)
    clock.advance(100)  # h1 silent 130 s, but seen silent only 100 s: not yet
    assert record.sweep(silence=10, grace=120) == []
    clock.advance(10)  # seen silent 110 s: the grace since its last heartbeat, seen
    assert record.sweep(silence=10, grace=120) == ["h1"]
    lost = record.vm(vm.vm_id)
    assert lost.state == "lost" and "host h1 lost: no heartbeat since" in lost.state_reason
    assert {h.name: h.state for h in record.hosts()} == {"h1": "lost", "h2": "suspect"}
    with pytest.raises(FencedOut):  # the old agent must register again and reconcile
        record.heartbeat("h1", e1)
    agents.register("h1", 10)
    h1 = next(h for h in record.hosts() if h.name == "h1")
    assert (h1.state, h1.allocated) == ("ready", 0)


def test_drain_stops_placements_and_survives_the_agents_restart(record: Record) -> None:
    agents = Agents(record)
    agents.register("h1", 10)
    agents.register("h2", 10)
    on_h1 = [vm for vm in (record.create("alice", agents.start) for _ in range(6)) if vm.host == "h1"]
    assert on_h1
    record.drain("h1")
    agents.register("h1", 10)  # an agent restarting does not end the drain
    assert {record.create("alice", agents.start).host for _ in range(5)} == {"h2"}
    assert all(record.vm(vm.vm_id).state == "running" for vm in on_h1)
    with pytest.raises(RecordConflict, match="not registered"):
        record.drain("h9")


def test_bad_input_is_refused_naming_the_field(record: Record) -> None:
    for field, call in (("host", lambda: record.register("H_1", capacity=1, viewer_address="a")),
                        ("capacity", lambda: record.register("h1", capacity=-1, viewer_address="a")),
                        ("viewer_address", lambda: record.register("h1", capacity=1, viewer_address="")),
                        ("owner", lambda: record.create("", reserve_only))):
        with pytest.raises(InvalidInput) as refused:
            call()
        assert refused.value.field == field


def test_route_changes_reach_a_fronts_cache_through_notify(record: Record, conninfo: str) -> None:
    agents = Agents(record)
    epoch = agents.register("h1", 10)
    vm = record.create("alice", agents.start)
    with Record(conninfo) as front:
        cache = RouteCache(conninfo, front.route)
        cache.start()
        try:
            route = cache.get(vm.vm_id)
            assert (route.host, route.generation, route.viewer_address) == ("h1", vm.generation, "h1.test:8443")
            assert cache.cached(vm.vm_id) == route

            def gone() -> bool:
                return cache.cached(vm.vm_id) is None

            record.register("h1", capacity=10, viewer_address="h1.test:9443")  # a new agent, a new address
            epoch = record.hosts()[0].agent_epoch
            assert cache.wait_until(gone, timeout=10)
            assert cache.get(vm.vm_id).viewer_address == "h1.test:9443"

            record.end("h1", epoch, vm.vm_id)
            assert cache.wait_until(gone, timeout=10)
            with pytest.raises(VmNotFound):
                cache.get(vm.vm_id)
        finally:
            cache.close()




def test_cluster_db_up_and_down_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    base = Path(tempfile.mkdtemp(prefix="browservm-cluster-cli-"))
    directory = base / "db"
    try:
        os.chmod(base, 0o711)
        assert main(["cluster", "db-up", str(directory), "--json"]) == 0
        facts = json.loads(capsys.readouterr().out)
        with psycopg.connect(facts["conninfo"]) as connection:  # the tables are there
            assert connection.execute("SELECT count(*) FROM hosts").fetchone() == (0,)
        assert main(["cluster", "db-up", str(directory)]) == 1  # already running: refused, with the fix
        assert "pg_ctl stop" in capsys.readouterr().err
    finally:
        assert main(["cluster", "db-down", str(directory)]) == 0
        shutil.rmtree(base)
    assert "stopped" in capsys.readouterr().out


def test_a_dead_fronts_reservation_is_released_after_its_time_and_lost_vms_are_forgotten(
        record: Record, clock: Clock) -> None:
    agents = Agents(record)
    agents.register("h1", 10)
    stale = record.create("alice", reserve_only)  # its front died before the agent was asked
    running = record.create("alice", agents.start)
    clock.advance(100)
    record.sweep(silence=1000, grace=2000, pending_for=300)
    assert record.vm(stale.vm_id).state == "pending"  # its front may still be at it
    clock.advance(250)
    record.sweep(silence=1000, grace=2000, pending_for=300)
    with pytest.raises(VmNotFound):
        record.vm(stale.vm_id)
    assert (record.host("h1").pending, record.host("h1").allocated) == (0, 1)
    assert [vm.vm_id for vm in record.vms(host="h1")] == [running.vm_id]

    with pytest.raises(RecordConflict, match="not lost"):
        record.forget(running.vm_id)  # a running VM is its host's to end
    clock.advance(3000)
    assert record.sweep(silence=1000, grace=2000) == []  # seen silent from now on
    clock.advance(1000)
    assert record.sweep(silence=1000, grace=2000) == ["h1"]
    record.forget(running.vm_id)
    assert record.vms() == []


def test_a_drained_host_resumes(record: Record) -> None:
    agents = Agents(record)
    agents.register("h1", 10)
    record.drain("h1")
    with pytest.raises(NoCapacity):
        record.create("alice", agents.start)
    record.resume("h1")
    assert record.create("alice", agents.start).host == "h1"
    with pytest.raises(RecordConflict, match="not draining"):
        record.resume("h1")


def test_the_record_says_unavailable_while_postgres_restarts_then_reconnects(server: Postgres, conninfo: str) -> None:
    with Record(conninfo) as record:
        record.register("h1", capacity=1, viewer_address="h1.test:8080")
        server.stop()
        try:
            with pytest.raises(RecordUnavailable, match="cannot be reached"):
                record.hosts()
        finally:
            server.start()
        assert [host.name for host in record.hosts()] == ["h1"]  # the next call connected again


def test_an_outage_of_the_database_itself_loses_no_host(record: Record, clock: Clock) -> None:
    agents = Agents(record)
    epochs = {host: agents.register(host, 10) for host in ("h1", "h2")}
    vm = record.create("alice", agents.start)
    clock.advance(600)  # nobody could write a heartbeat, or sweep, for ten minutes
    assert record.sweep(silence=10, grace=120) == []
    assert {h.state for h in record.hosts()} == {"suspect"}  # no placements until they are heard again
    for host, epoch in epochs.items():
        record.heartbeat(host, epoch)
    clock.advance(5)
    assert record.sweep(silence=10, grace=120) == []
    assert {h.state for h in record.hosts()} == {"ready"} and record.vm(vm.vm_id).state == "running"


def test_a_create_given_up_on_just_as_its_agent_confirmed_returns_the_vm(record: Record) -> None:
    agents = Agents(record)
    agents.register("h1", 10)

    def confirmed_then_timed_out(vm: Vm) -> Vm:
        agents.start(vm)  # the agent made and confirmed it...
        raise HostRefused(vm.host, "its agent did not answer create within 60 s")  # ...the answer was lost

    vm = record.create("alice", confirmed_then_timed_out)
    assert (vm.state, vm.host) == ("running", "h1")
    assert (record.host("h1").allocated, record.host("h1").pending) == (1, 0)
