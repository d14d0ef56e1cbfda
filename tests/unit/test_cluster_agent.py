"""A host's agent (browservm.cluster.agent) against an in-memory record and host: how it settles the
record against its host, and what it does when fenced out. The real record, Ray and processes are
tests/integration/test_cluster.py's."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from browservm.cluster.agent import HostAgent, Refusal
from browservm.cluster.errors import FencedOut, RecordConflict, Superseded
from browservm.cluster.record import Host, Record, Vm

NOW = datetime(2026, 12, 7, tzinfo=UTC)


class MemoryRecord:
    """The part of Record an agent uses, in memory, fenced by epoch as the real one is."""

    def __init__(self) -> None:
        self.epoch = 0
        self.state = "ready"
        self.rows: dict[str, Vm] = {}

    def register(self, host: str, *, capacity: int, viewer_address: str) -> int:
        self.epoch += 1
        self.state = "ready"
        return self.epoch

    def _fence(self, epoch: int) -> None:
        if epoch != self.epoch:
            raise FencedOut("h1", epoch, self.epoch)

    def heartbeat(self, host: str, epoch: int) -> None:
        self._fence(epoch)

    def host(self, name: str) -> Host:
        return Host(name, 10, 0, 0, self.state, "", NOW, self.epoch, "h1:8080")

    def vms(self, *, host: str | None = None, owner: str | None = None) -> list[Vm]:
        return list(self.rows.values())

    def reserve(self, vm_id: str) -> None:
        self.rows[vm_id] = Vm(vm_id, "h1", 1, "pending", "", "alice", NOW, None, "e", None)

    def confirm(self, host: str, epoch: int, reservation: str, vm_id: str) -> Vm:
        self._fence(epoch)
        if reservation not in self.rows:
            raise RecordConflict(f"VM {reservation}", "no pending reservation")
        row = replace(self.rows.pop(reservation), vm_id=vm_id, state="running", reserved_as=reservation)
        self.rows[vm_id] = row
        return row

    def end(self, host: str, epoch: int, vm_id: str) -> None:
        self._fence(epoch)
        if self.rows.pop(vm_id, None) is None:
            raise RecordConflict(f"VM {vm_id}", "not running")


class MemoryHost:
    def __init__(self) -> None:
        self.vms: set[str] = set()
        self.destroyed: list[str] = []
        self.hold: asyncio.Event | None = None  # a create waits for it (made, not yet returned)
        self.made = 0
        self.on_present: Callable[[], Awaitable[object]] | None = None  # runs once, as the host is looked at

    async def start(self) -> None:
        pass

    async def create(self, request: dict[str, Any]) -> str:
        self.made += 1
        vm_id = f"vm-{self.made}"
        self.vms.add(vm_id)
        if self.hold is not None:
            await self.hold.wait()
        return vm_id

    async def destroy(self, vm_id: str) -> None:
        self.vms.discard(vm_id)
        self.destroyed.append(vm_id)

    async def present(self) -> set[str]:
        listed = set(self.vms)
        if self.on_present is not None:  # happens just after the host was listed
            work, self.on_present = self.on_present, None
            await work()
        return listed

    async def describe(self, vm_id: str) -> dict[str, Any]:
        return {"vm_id": vm_id}

    async def describe_all(self) -> dict[str, dict[str, Any]]:
        return {vm_id: {"vm_id": vm_id} for vm_id in self.vms}

    async def viewer(self, vm_id: str) -> dict[str, Any]:
        return {"vm_id": vm_id}


def agent_of(record: MemoryRecord, host: MemoryHost, capacity: int = 10) -> HostAgent:
    return HostAgent("h1", cast(Record, record), host, capacity=capacity, viewer_address="h1:8080")


def test_settling_destroys_orphans_ends_what_is_gone_and_clears_what_was_lost() -> None:
    record, host = MemoryRecord(), MemoryHost()
    host.vms = {"vm-orphan", "vm-kept", "vm-was-lost"}
    record.rows = {vm_id: Vm(vm_id, "h1", 1, state, "host h1 lost" if state == "lost" else "", "alice", NOW, None,
                             "e", None)
                   for vm_id, state in (("vm-kept", "running"), ("vm-gone", "running"), ("vm-was-lost", "lost"))}
    agent = agent_of(record, host)
    actions = asyncio.run(agent.register())
    assert host.vms == {"vm-kept"}
    assert sorted(host.destroyed) == ["vm-orphan", "vm-was-lost"]
    assert sorted(record.rows) == ["vm-kept", "vm-was-lost"]  # the lost row stays for its user to read why
    assert len(actions) == 3 and any("vm-gone" in action and "ended" in action for action in actions)


def test_a_settle_while_a_create_is_in_flight_leaves_its_vm_alone() -> None:
    async def scenario() -> tuple[Vm | Refusal, list[str]]:
        record, host = MemoryRecord(), MemoryHost()
        agent = agent_of(record, host)
        await agent.register()
        record.reserve("vm-reserved")
        host.hold = asyncio.Event()
        creating = asyncio.create_task(agent.create("vm-reserved", {"user": "alice"}))
        while not host.vms:  # made on the host, not confirmed yet
            await asyncio.sleep(0)
        await agent.settle()
        host.hold.set()
        made = await creating
        await agent.settle()
        return made, host.destroyed

    made, destroyed = asyncio.run(scenario())
    assert isinstance(made, Vm) and made.vm_id == "vm-1" and destroyed == []


def test_a_vm_confirmed_while_a_settle_looks_is_not_taken_for_ended() -> None:
    record, host = MemoryRecord(), MemoryHost()
    agent = agent_of(record, host)
    asyncio.run(agent.register())
    record.reserve("r1")
    host.on_present = lambda: agent.create("r1", {"user": "alice"})  # made and confirmed as the host is listed
    asyncio.run(agent.settle())
    assert host.vms == {"vm-1"} and sorted(record.rows) == ["vm-1"] and host.destroyed == []


def test_a_full_host_refuses_and_a_refused_confirm_undoes_the_vm() -> None:
    record, host = MemoryRecord(), MemoryHost()
    agent = agent_of(record, host, capacity=1)
    asyncio.run(agent.register())
    record.reserve("r1")
    made = asyncio.run(agent.create("r1", {"user": "alice"}))
    assert isinstance(made, Vm) and (made.vm_id, made.reserved_as, made.state) == ("vm-1", "r1", "running")
    refused = asyncio.run(agent.create("r2", {"user": "alice"}))
    assert isinstance(refused, Refusal) and "full: 1 of 1" in refused.reason

    agent.capacity = 2
    with pytest.raises(RecordConflict):  # its reservation was released meanwhile (its front gave up)
        asyncio.run(agent.create("r-released", {"user": "alice"}))
    assert host.vms == {"vm-1"} and host.destroyed == ["vm-2"]


def test_fenced_out_by_the_hosts_loss_it_registers_again_by_a_newer_agent_it_ends() -> None:
    record, host = MemoryRecord(), MemoryHost()
    agent = agent_of(record, host)
    asyncio.run(agent.register())
    record.epoch += 1  # the sweep declared the host lost
    record.state = "lost"
    actions = asyncio.run(agent.tick())
    assert agent.epoch == record.epoch == 3 and "registered again" in actions[0]

    newer = agent_of(record, host)
    asyncio.run(newer.register())
    with pytest.raises(Superseded) as superseded:
        asyncio.run(agent.tick())
    assert (superseded.value.epoch, superseded.value.current) == (3, 4)
