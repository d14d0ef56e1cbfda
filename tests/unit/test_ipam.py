import multiprocessing
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest

from browservm.errors import NameCollision, PoolExhausted, StateError
from browservm.ids import names_for
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.store import Store


def make_ipam(path: Path, subnet: str = "192.168.100.0/24") -> tuple[Store, Ipam]:
    store = Store(path / "state.sqlite3")
    return store, Ipam(store, NetworkPlan.build(IPv4Network(subnet), "br0"))


def test_first_lease_is_after_the_gateway_and_carries_the_vm_names(tmp_path: Path) -> None:
    _, ipam = make_ipam(tmp_path)
    lease = ipam.lease("vm-a")
    assert lease.address == IPv4Interface("192.168.100.2/24")
    assert lease.gateway == IPv4Address("192.168.100.1")
    assert lease.bridge == "br0"
    assert (lease.tap, lease.mac) == (names_for("vm-a").tap, names_for("vm-a").mac)


def test_leasing_twice_returns_the_same_lease(tmp_path: Path) -> None:
    _, ipam = make_ipam(tmp_path)
    assert ipam.lease("vm-a") == ipam.lease("vm-a")
    assert len(ipam.leases()) == 1


def test_a_small_subnet_is_exhausted_with_a_clear_error_and_never_hands_out_reserved_addresses(
        tmp_path: Path) -> None:
    _, ipam = make_ipam(tmp_path, "10.9.0.0/29")  # .0 network, .1 gateway, .7 broadcast
    got = {ipam.lease(f"vm-{i}").address.ip for i in range(5)}
    assert got == {IPv4Address(f"10.9.0.{i}") for i in range(2, 7)}
    with pytest.raises(PoolExhausted) as excinfo:
        ipam.lease("vm-too-many")
    assert "10.9.0.0/29" in str(excinfo.value) and "5" in str(excinfo.value)


def test_release_happens_exactly_once_and_the_address_is_reused_last(tmp_path: Path) -> None:
    _, ipam = make_ipam(tmp_path, "10.9.0.0/29")
    first = ipam.lease("vm-a")
    ipam.lease("vm-b")
    assert ipam.release("vm-a") == first
    assert ipam.release("vm-a") is None
    # Next-fit: the freed .2 comes back only after .4 .. .6 are used.
    later = [ipam.lease(f"vm-{i}").address.ip for i in range(4)]
    assert later == [IPv4Address(f"10.9.0.{i}") for i in (4, 5, 6, 2)]


def test_leases_survive_a_restart(tmp_path: Path) -> None:
    store, ipam = make_ipam(tmp_path)
    leases = [ipam.lease(f"vm-{i}") for i in range(3)]
    store.close()
    store, ipam = make_ipam(tmp_path)
    assert ipam.leases() == leases
    assert ipam.lease("vm-new").address.ip == IPv4Address("192.168.100.5")


def test_a_large_subnet_spans_bridges_and_each_vm_gets_its_segment(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    ipam = Ipam(store, NetworkPlan.build(IPv4Network("10.20.0.0/20"), "br0"))
    leases = [ipam.lease(f"vm-{i}") for i in range(4000)]
    assert len({lease.address.ip for lease in leases}) == 4000
    by_bridge = {lease.bridge for lease in leases}
    assert by_bridge == {"br0", "br0-1", "br0-2", "br0-3"}
    for lease in leases:
        assert lease.address.network.prefixlen == 22
        assert lease.gateway == lease.address.network.network_address + 1
        assert lease.address.ip not in (lease.gateway, lease.address.network.broadcast_address)


def test_a_tap_name_collision_is_detected_not_shared(tmp_path: Path) -> None:
    store, ipam = make_ipam(tmp_path)
    ipam.lease("vm-a")
    # Two ids cannot be made to collide on purpose; plant the row a colliding id would meet.
    with store.transaction() as db:
        db.execute("UPDATE leases SET tap = ? WHERE vm_id = 'vm-a'", (names_for("vm-b").tap,))
    with pytest.raises(NameCollision) as excinfo:
        ipam.lease("vm-b")
    assert excinfo.value.other_vm_id == "vm-a" and excinfo.value.what == "TAP name"
    assert ipam.get("vm-b") is None


def test_a_lease_outside_a_changed_subnet_is_reported(tmp_path: Path) -> None:
    _, ipam = make_ipam(tmp_path)
    ipam.lease("vm-a")
    _, ipam = make_ipam(tmp_path, "10.0.0.0/24")
    with pytest.raises(StateError, match="outside the configured subnet"):
        ipam.leases()


def _lease_many(path: str, prefix: str, count: int, queue: "multiprocessing.Queue[list[str]]") -> None:
    store = Store(Path(path))
    ipam = Ipam(store, NetworkPlan.build(IPv4Network("10.30.0.0/22"), "br0"))
    queue.put([str(ipam.lease(f"{prefix}-{i}").address.ip) for i in range(count)])


def test_two_processes_leasing_at_once_never_share_an_address(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    Store(Path(path)).close()
    context = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[list[str]] = context.Queue()
    workers = [context.Process(target=_lease_many, args=(path, name, 300, queue)) for name in ("a", "b")]
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    addresses = results[0] + results[1]
    assert len(addresses) == 600
    assert len(set(addresses)) == 600


def test_a_state_directory_serves_one_namespace(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.sqlite3")
    store.claim("netns", "one")
    store.claim("netns", "one")
    with pytest.raises(StateError, match="belongs to netns 'one'"):
        store.claim("netns", "two")


def test_an_unusable_state_directory_names_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StateError) as excinfo:
        Store(blocker / "state.sqlite3")
    assert str(blocker / "state.sqlite3") in str(excinfo.value)
