"""Persistent browser profiles on the host (issue 22): when a VM's profile is loaded and saved (a fake keeper
in the guest's place: the real one is tests/integration/test_profile_e2e.py's), one live VM per profile,
and the store of keys and sealed files."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from browservm.errors import InvalidInput, ProfileInUse, ProfileNotFound
from browservm.oauth.errors import VaultError
from browservm.profiles.store import ProfileStore
from browservm.store import Store
from browservm.templates import Template, Templates
from browservm.vm import hops
from browservm.vm.manager import VMManager
from browservm.vm.parts import Limits
from browservm.vm.pool import PoolSettings, WarmPool
from browservm.vm.records import Owner, VmRecord, VmRecords
from browservm.vm.state import VmState

from .fakes import FakeKeeper, Parts
from .test_api import Served, create, error_of

PERSISTENT = Owner(profile="persistent")  # as a request asks for it
DEADLINE = 20.0


def _manager(parts: Parts, keeper: FakeKeeper | None) -> VMManager:
    manager = parts.manager(limits=Limits(max_vms=6, max_vms_per_user=3))
    manager.profiles = keeper
    return manager


def test_a_persistent_vm_has_its_profile_loaded_before_it_is_ready_and_saved_before_it_ends(parts: Parts) -> None:
    async def scenario() -> None:
        keeper = FakeKeeper()
        manager = _manager(parts, keeper)
        record, task = await manager.start("ann", owner=PERSISTENT)
        ready = await asyncio.wait_for(task, DEADLINE)
        assert keeper.loaded == [(record.vm_id, VmState.BOOTING, "ann")]  # before it was ready
        assert ready.state == VmState.READY and hops.PROFILE_LOAD in ready.stages and ready.profile == "persistent"
        assert await manager.destroy(record.vm_id, ended_reason="done")
        assert keeper.saved == [record.vm_id]
        ended = await manager.get(record.vm_id)
        assert ended is not None and ended.state == VmState.ENDED and ended.ended_reason == "done"
        plain, task = await manager.start("bob")  # an ephemeral VM: neither loaded nor saved
        await asyncio.wait_for(task, DEADLINE)
        await manager.destroy(plain.vm_id)
        assert len(keeper.loaded) == 1 and keeper.saved == [record.vm_id]
        await manager.close()
    asyncio.run(scenario())


def test_one_live_vm_per_profile_and_the_profile_is_free_again_once_it_ends(parts: Parts) -> None:
    async def scenario() -> None:
        manager = _manager(parts, FakeKeeper())
        first, task = await manager.start("ann", owner=PERSISTENT)
        with pytest.raises(ProfileInUse, match=first.vm_id):
            await manager.start("Ann", owner=PERSISTENT)  # the same person, spelt otherwise
        with pytest.raises(ProfileInUse):
            await manager.start("ann", owner=Owner(tenant="", labels={"x": "y"}, profile="persistent"))
        other, other_task = await manager.start("ann", owner=Owner(tenant="acme", profile="persistent"))
        plain, plain_task = await manager.start("ann")  # without the profile: no limit of its own
        await asyncio.wait_for(asyncio.gather(task, other_task, plain_task), DEADLINE)
        await manager.destroy(first.vm_id, ended_reason="done")
        again, again_task = await manager.start("ann", owner=PERSISTENT)
        await asyncio.wait_for(again_task, DEADLINE)
        for vm in (other, plain, again):
            await manager.destroy(vm.vm_id)
        await manager.close()
    asyncio.run(scenario())


def test_a_profile_that_cannot_be_loaded_fails_the_vm_at_its_hop_and_is_never_saved_over(parts: Parts) -> None:
    async def scenario() -> None:
        keeper = FakeKeeper()
        keeper.load_fails = "the keeper answered 422: the sealed profile does not open with this user's key"
        manager = _manager(parts, keeper)
        record, task = await manager.start("ann", owner=PERSISTENT)
        await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), DEADLINE)
        failed = await manager.get(record.vm_id)
        assert failed is not None and failed.state == VmState.FAILED and failed.failure is not None
        assert (failed.failure.hop, failed.failure.reason) == (hops.PROFILE_LOAD, keeper.load_fails)
        assert "7002" in failed.failure.hint
        keeper.load_fails = None
        again, again_task = await manager.start("ann", owner=PERSISTENT)  # a failed VM does not hold it
        await asyncio.wait_for(again_task, DEADLINE)
        await manager.destroy(record.vm_id)
        assert keeper.saved == []  # what never loaded is never saved over the profile kept
        await manager.destroy(again.vm_id)
        assert keeper.saved == [again.vm_id]
        assert parts.leftovers()["taps"] == set()
        await manager.close()
    asyncio.run(scenario())


def test_a_save_that_fails_keeps_the_old_profile_says_why_and_the_vm_still_ends(parts: Parts) -> None:
    async def scenario() -> None:
        keeper = FakeKeeper()
        manager = _manager(parts, keeper)
        notes: list[tuple[str, str]] = []
        manager.on_note = lambda record, kind, detail: notes.append((kind, detail))
        record, task = await manager.start("ann", owner=PERSISTENT)
        await asyncio.wait_for(task, DEADLINE)
        keeper.save_fails = "the keeper answered 422: the profile packs to over the 1048576 bytes the controller keeps"
        assert await manager.destroy(record.vm_id, ended_reason="reaped: idle")
        ended = await manager.get(record.vm_id)
        assert ended is not None and ended.state == VmState.ENDED
        assert ended.ended_reason.startswith("reaped: idle; its browser profile was not saved")
        assert keeper.save_fails in ended.ended_reason
        assert ("profile", ended.ended_reason.removeprefix("reaped: idle; ")) in notes
        assert parts.leftovers()["vmms"] == []
        await manager.close()
    asyncio.run(scenario())


def test_a_profile_needs_a_keeper_and_a_template_with_a_browser(parts: Parts) -> None:
    async def scenario() -> None:
        manager = _manager(parts, None)
        with pytest.raises(InvalidInput, match="keeps no browser profiles") as refused:
            await manager.start("ann", owner=PERSISTENT)
        assert refused.value.field == "profile"
        templates = Templates({"default": Template("default"), "bare": Template("bare", image_profile="minimal")})
        manager = parts.manager(templates=templates)
        manager.profiles = FakeKeeper()
        with pytest.raises(InvalidInput, match="no browser"):
            await manager.start("ann", owner=PERSISTENT, template="bare")
        assert await manager.all() == []
        await manager.close()
    asyncio.run(scenario())


def test_a_vm_claimed_from_the_pool_gets_the_profile_before_it_is_handed_over(parts: Parts) -> None:
    async def scenario() -> None:
        keeper = FakeKeeper()
        settings = PoolSettings(size=1, max_age=600, memory_mib=8192, refill_delay=0.5)
        manager = parts.manager(limits=Limits(max_vms=8, max_vms_per_user=2), restore_by_default=True,
                                pool=lambda vms: WarmPool(vms, VmRecords(parts.store), settings,
                                                          max_per_user=lambda: 2))
        manager.profiles = keeper
        pool = manager.pool
        assert pool is not None
        running = asyncio.create_task(pool.run())
        try:
            assert await pool.wait_filled(DEADLINE)
            record, _ = await manager.start("ann", owner=PERSISTENT)
            assert record.started_from == "pooled"
            assert keeper.loaded == [(record.vm_id, VmState.READY, "ann")]  # the claimed VM, as the user's
            stored = await manager.get(record.vm_id)
            assert stored is not None and hops.PROFILE_LOAD in stored.stages and stored.profile == "persistent"
            await manager.destroy(record.vm_id)
            assert keeper.saved == [record.vm_id]

            # A claimed VM the profile cannot go into is ended; the user gets a new VM, which loads it at its start.
            assert await pool.wait_filled(DEADLINE)
            pooled_ids = {r.vm_id for r in await manager.all() if r.in_pool}
            keeper.load_fails = "the desktop did not answer stop-browser"
            first_try = asyncio.get_running_loop().create_task(manager.start("bob", owner=PERSISTENT))
            await asyncio.sleep(0.2)
            keeper.load_fails = None
            fresh, fresh_task = await first_try
            await asyncio.wait_for(fresh_task, DEADLINE)
            assert fresh.vm_id not in pooled_ids and fresh.started_from != "pooled"
            gone = [await manager.get(vm_id) for vm_id in pooled_ids]
            assert any(r is not None and r.state == VmState.ENDED and "could not be loaded" in r.ended_reason
                       for r in gone), gone
            assert keeper.saved == [record.vm_id]  # the VM it never went into was not saved over it
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await manager.close()
    asyncio.run(scenario())


# --- the store: keys and sealed files ---------------------------------------------------------------------

@pytest.fixture
def store(tmp_path: Path) -> ProfileStore:
    return ProfileStore(Store(tmp_path / "state.sqlite3"), secrets.token_bytes(32), tmp_path / "profiles", 1024)


def test_each_user_has_one_key_sealed_with_the_vault_key(store: ProfileStore) -> None:
    ann = store.key("", "ann")
    assert len(ann) == 32 and store.key("", "ann") == ann
    assert store.key("", "bob") != ann and store.key("acme", "ann") != ann
    sealed = store._store.read("SELECT sealed_key FROM profiles WHERE tenant = '' AND user = 'ann'")[0][0]
    assert isinstance(sealed, bytes) and ann not in sealed
    other_vault = ProfileStore(store._store, secrets.token_bytes(32), store.directory, 1024)
    with pytest.raises(VaultError, match="another vault key"):
        other_vault.key("", "ann")
    # A sealed key moved to another user's row does not open as theirs.
    with store._store.transaction() as db:
        db.execute("UPDATE profiles SET sealed_key = ? WHERE tenant = '' AND user = 'bob'", (sealed,))
    with pytest.raises(VaultError, match="does not authenticate"):
        store.key("", "bob")


def test_a_profile_is_written_whole_and_bounded(store: ProfileStore) -> None:
    store.key("", "ann")
    assert store.read("", "ann") == b""
    store.write("", "ann", b"sealed-1")
    assert store.read("", "ann") == b"sealed-1"
    assert oct(store.path("", "ann").stat().st_mode & 0o777) == "0o600"
    with pytest.raises(VaultError, match="over the 1024 kept"):
        store.write("", "ann", b"x" * 1025)
    assert store.read("", "ann") == b"sealed-1"  # the last one kept
    assert [p.name for p in store.directory.iterdir()] == [store.path("", "ann").name]  # no staged file left
    info = store.info("", "ann")
    assert (info.size, info.in_use_by) == (8, None) and info.saved_at is not None
    assert store.path("", "ann") != store.path("acme", "ann")


def test_a_profile_in_use_is_not_deleted_and_a_deleted_one_is_gone(store: ProfileStore) -> None:
    store.key("", "ann")
    store.write("", "ann", b"sealed")
    records = VmRecords(store._store)
    live = VmRecord(vm_id="vm-0123456789ab", user="ann", vcpus=1, mem_mib=512, directory="x", profile="persistent")
    records.insert(live, max_total=10, max_per_user=5)
    with pytest.raises(ProfileInUse, match="vm-0123456789ab"):
        store.delete("", "ann")
    assert store.info("", "ann").in_use_by == "vm-0123456789ab"
    live.state = VmState.FAILED
    records.save(live)
    store.delete("", "ann")
    assert not store.path("", "ann").exists()
    with pytest.raises(ProfileNotFound):
        store.delete("", "ann")
    with pytest.raises(ProfileNotFound):
        store.info("", "ann")
    assert store.key("", "ann")  # a new key for a new profile


# --- the API, over a served controller with fakes (the guest's keeper faked, the store real) ----------------

def test_the_api_gives_a_user_one_profile_vm_at_a_time_and_forgets_the_profile_on_request(
        serve: Callable[..., Served]) -> None:
    served = serve()

    async def scenario(client: httpx.AsyncClient) -> str:
        vm = await create(client, profile="persistent")
        assert vm["profile"] == "persistent" and hops.PROFILE_LOAD in vm["stages"]
        second = await client.post("/v1/vms", json={"user": "ann", "profile": "persistent"})
        error = error_of(second, 409)
        assert error["type"] == "ProfileInUse" and error["vm_id"] == vm["vm_id"] and vm["vm_id"] in error["message"]
        bob = await create(client, user="bob", profile="persistent")  # left running: the stop ends it
        assert bob["profile"] == "persistent"
        shown = (await client.get("/v1/users/ann/profile")).json()
        assert (shown["size_bytes"], shown["saved_at"], shown["in_use_by"]) == (0, None, vm["vm_id"])
        refused = error_of(await client.delete("/v1/users/ann/profile"), 409)
        assert refused["type"] == "ProfileInUse"
        assert (await client.delete(f"/v1/vms/{vm['vm_id']}")).json()["removed"]
        shown = (await client.get("/v1/users/Ann/profile")).json()  # one spelling per person, as for VMs
        assert shown["size_bytes"] == len(f"sealed in {vm['vm_id']}") and shown["in_use_by"] is None
        assert shown["saved"].endswith("Z")
        assert (await client.delete("/v1/users/ann/profile")).json() == {"user": "ann", "removed": True}
        assert error_of(await client.get("/v1/users/ann/profile"), 404)["type"] == "ProfileNotFound"
        assert (await client.delete("/v1/users/ann/profile")).json() == {"user": "ann", "removed": False}
        bad = error_of(await client.post("/v1/vms", json={"user": "ann", "profile": "forever"}), 422)
        assert "profile" in bad["message"]
        return str(bob["vm_id"])

    bob_vm = served.run(scenario)
    # stop_vms_on_exit: the controller's stop saved bob's profile as it ended his VM.
    kept = [path.read_bytes() for path in (served.parts.vm_root.parent / "profiles").glob("*.sealed")]
    assert kept == [f"sealed in {bob_vm}".encode()]
