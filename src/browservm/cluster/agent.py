"""A host's agent: the one writer of its host's VMs in the cluster's record.

It registers (a new epoch: every write after carries it, so a presumed-dead agent can never
overwrite what replaced it), re-adopts what its host runs, and from then on every `tick`
heartbeats and settles the record against the host:

    on the host, not in the record      made for a reservation that was released (its front died,
                                        or it timed out): destroyed, never half-made
    in the record running, not on host  it ended there (reaped, destroyed, the host rebooted):
                                        its row ends, its slot is free
    in the record lost                  the host was declared lost meanwhile: what still runs of
                                        it is destroyed, the row stays for its user to read why

The VMs themselves are the host's (`HostVms`): its controller, whose own store re-adopts the
VMMs after a restart (they are not the agent's children). Ray supervises the agent
(ray_agent.py); nothing here knows Ray.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Protocol

from browservm.cluster.errors import FencedOut, RecordConflict, RecordUnavailable, Superseded
from browservm.cluster.record import Record, Vm
from browservm.errors import BrowserVMError

log = logging.getLogger("browservm.agent")


class HostVms(Protocol):
    """The VMs of one host, as its agent drives them."""

    async def start(self) -> None:
        """Take the host's VMs over (re-adopt what runs); before the agent registers."""
        ...

    async def create(self, request: dict[str, Any]) -> str:
        """Make a VM (the API's CreateVm body) and return its id on this host; BrowserVMError when it cannot."""
        ...

    async def destroy(self, vm_id: str) -> None: ...

    async def present(self) -> set[str]:
        """Every VM the host holds (booting, ready or failed): what the record must account for."""
        ...

    async def describe(self, vm_id: str) -> dict[str, Any]:
        """What the host knows of one VM (its state, hops, failure): the API's VmOut, as JSON."""
        ...

    async def describe_all(self) -> dict[str, dict[str, Any]]:
        """describe() of every VM the host holds, by id."""
        ...

    async def viewer(self, vm_id: str) -> dict[str, Any]:
        """A viewer link (the API's ViewerOut, as JSON), on the host's own address."""
        ...


@dataclass(frozen=True)
class Refusal:
    """Why an agent will not take a VM: the front releases the reservation and tries the next host."""

    reason: str


class HostAgent:
    def __init__(self, name: str, record: Record, vms: HostVms, *, capacity: int, viewer_address: str) -> None:
        self.name = name
        self._record = record
        self._vms = vms
        self.capacity = capacity
        self.viewer_address = viewer_address
        self.epoch: int | None = None
        # Creates in flight, and creates begun: until a create confirms, its VM is on the host and not placed,
        # so `settle` destroys orphans only when no create overlapped its look at the host and the record.
        self._creating = 0
        self._creates_begun = 0
        # The host's VMs by its own count, as of the last look plus what this agent made and ended since:
        # a create checks room on it without listing the host (the record's reservation guards it first).
        self._held: set[str] = set()

    async def _call(self, method: Any, *args: Any) -> Any:
        return await asyncio.to_thread(method, *args)

    async def register(self) -> list[str]:
        """Take the host over (a new epoch) and settle the record against it; returns what was done."""
        self.epoch = await self._call(lambda: self._record.register(
            self.name, capacity=self.capacity, viewer_address=self.viewer_address))
        actions = await self.settle()
        log.info("host %s: registered with epoch %s%s", self.name, self.epoch,
                 "".join(f"\n  {action}" for action in actions))
        return actions

    async def tick(self) -> list[str]:
        """Heartbeat, then settle. Fenced out by the host's loss (the sweep moved the epoch): register again,
        the host is back. Fenced out by a newer agent's registration: Superseded, this one must end."""
        assert self.epoch is not None, "register first"
        try:
            await self._call(self._record.heartbeat, self.name, self.epoch)
        except FencedOut as fenced:
            host = await self._call(self._record.host, self.name)
            if host.state != "lost":
                raise Superseded(self.name, self.epoch, fenced.current) from None
            log.warning("%s; the host was lost and is back: registering again", fenced)
            return [f"fenced out ({host.state_reason}): registered again", *await self.register()]
        return await self.settle()

    async def settle(self) -> list[str]:
        assert self.epoch is not None
        epoch = self.epoch
        quiet = not self._creating  # no create in flight as it begins to look
        begun = self._creates_begun
        # The record first, then the host: a VM is made before it is confirmed, so one the record has
        # running is on the host unless it ended; the other way round, one confirmed between the two looks
        # would seem to have ended.
        placed = await self._call(lambda: self._record.vms(host=self.name))
        present = await self._vms.present()
        self._held = set(present)
        actions: list[str] = []
        if quiet and self._creates_begun == begun:  # and none began since: no create overlapped this look
            for vm_id in sorted(present - {vm.vm_id for vm in placed}):
                await self.destroy_only(vm_id)
                actions.append(f"{vm_id}: on this host but not placed here (its reservation was released): destroyed")
        for vm in placed:
            if vm.state == "running" and vm.vm_id not in present:
                await self._ignore_conflict(self._record.end, self.name, epoch, vm.vm_id)
                actions.append(f"{vm.vm_id}: placed here, no longer on this host: ended")
            elif vm.state == "lost" and vm.vm_id in present:
                await self.destroy_only(vm.vm_id)
                actions.append(f"{vm.vm_id}: lost with this host ({vm.state_reason}): destroyed")
        return actions

    async def _ignore_conflict(self, method: Any, *args: Any) -> None:
        try:
            await self._call(method, *args)
        except RecordConflict as conflict:  # another call of ours got there first
            log.info("%s", conflict)

    async def create(self, reservation: str, request: dict[str, Any]) -> Refusal | Vm:
        """Make the VM reserved here and confirm it: the VM as confirmed (under this host's id), or a Refusal."""
        if self.epoch is None:
            return Refusal("its agent has not registered yet")
        epoch = self.epoch
        self._creating += 1
        self._creates_begun += 1
        try:
            if len(self._held) >= self.capacity:
                return Refusal(f"full: {len(self._held)} of {self.capacity} VMs")
            try:
                vm_id = await self._vms.create(request)
            except BrowserVMError as error:
                return Refusal(f"could not create the VM: {error}")
            self._held.add(vm_id)
            try:
                confirmed: Vm = await self._call(self._record.confirm, self.name, epoch, reservation, vm_id)
            except (FencedOut, RecordConflict, RecordUnavailable):
                await self.destroy_only(vm_id)  # never half-made: the front releases or already released it
                raise
            return confirmed
        finally:
            self._creating -= 1

    async def destroy_only(self, vm_id: str) -> None:
        """The VM gone from the host; its row is someone else's to end (or there is none)."""
        await self._vms.destroy(vm_id)
        self._held.discard(vm_id)

    async def destroy(self, vm_id: str) -> None:
        assert self.epoch is not None, "register first"
        await self.destroy_only(vm_id)
        try:
            await self._ignore_conflict(self._record.end, self.name, self.epoch, vm_id)
        except RecordUnavailable as error:  # the VM is gone from the host: the next settle ends its row
            log.warning("%s ended on host %s; its row ends at the next heartbeat: %s", vm_id, self.name, error)

    async def describe(self, vm_id: str) -> dict[str, Any]:
        return await self._vms.describe(vm_id)

    async def describe_all(self) -> dict[str, dict[str, Any]]:
        return await self._vms.describe_all()

    async def viewer(self, vm_id: str) -> dict[str, Any]:
        return await self._vms.viewer(vm_id)
