"""A front: the cluster's `/v1` API on any machine, placing VMs through the record and calling hosts'
agents through Ray. It holds no state of its own: fronts can be many, and one killed mid-create
leaves a pending reservation that the sweep releases (and the host's agent destroys what it made).

Every method blocks (the record, Ray): the app calls them in threads.

It also watches the hosts, as every front does (the record's updates are idempotent):
- a host whose Ray node is dead (Ray's health check) is `suspect` at once: no placements;
- the sweep: a silent host suspect, past the grace lost with its VMs, stale reservations released.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from browservm.cluster.agent import Refusal
from browservm.cluster.errors import HostError, HostRefused, RecordConflict
from browservm.cluster.ray_agent import LABEL, Agents
from browservm.cluster.record import Host, Record, Vm

DEFAULT_SILENCE = 10.0  # seconds without a heartbeat before a host is suspect (agents beat every 2 s)
DEFAULT_GRACE = 120.0  # seconds without a heartbeat before a suspect host is lost with its VMs

Nodes = Callable[[], list[dict[str, Any]]]


@dataclass(frozen=True)
class PlacedVm:
    """A VM as the cluster knows it: the record's row, and what its host says of it (when reachable)."""

    vm: Vm
    detail: dict[str, Any] | None
    detail_error: str | None


def dead_hosts(nodes: list[dict[str, Any]]) -> set[str]:
    """Hosts whose Ray nodes are all dead (a host's node that restarted is a new, live node)."""
    alive: set[str] = set()
    dead: set[str] = set()
    for node in nodes:
        host = (node.get("Labels") or {}).get(LABEL)
        if host:
            (alive if node.get("Alive") else dead).add(host)
    return dead - alive


class Front:
    def __init__(self, record: Record, agents: Agents, nodes: Nodes, *, silence: float = DEFAULT_SILENCE,
                 grace: float = DEFAULT_GRACE) -> None:
        self.record = record
        self.agents = agents
        self._nodes = nodes
        self.silence = silence
        self.grace = grace

    # --- VMs ---------------------------------------------------------------------------------------

    def create(self, request: dict[str, Any], idempotency_key: str | None) -> Vm:
        def start(vm: Vm) -> Vm:
            try:
                made = self.agents.call(vm.host, "create", vm.vm_id, request)
            except HostError as error:
                raise HostRefused(vm.host, error.reason) from None
            if isinstance(made, Refusal):
                raise HostRefused(vm.host, made.reason)
            assert isinstance(made, Vm), made
            return made

        return self.record.create(str(request["user"]), start, idempotency_key=idempotency_key)

    def get(self, vm_id: str) -> PlacedVm:
        vm = self.record.vm(vm_id)
        if vm.state != "running":
            return PlacedVm(vm, None, None)
        try:
            return PlacedVm(vm, self.agents.call(vm.host, "describe", vm.vm_id, timeout=10), None)
        except HostError as error:
            return PlacedVm(vm, None, str(error))

    def all(self) -> list[PlacedVm]:
        """Every VM, each with its host's view of it: one call per host."""
        vms = self.record.vms()
        views: dict[str, dict[str, dict[str, Any]]] = {}
        failed: dict[str, str] = {}
        for host in sorted({vm.host for vm in vms if vm.state == "running"}):
            try:
                views[host] = self.agents.call(host, "describe_all", timeout=10)
            except HostError as error:
                failed[host] = str(error)
        return [PlacedVm(vm, views.get(vm.host, {}).get(vm.vm_id), failed.get(vm.host)) for vm in vms]

    def delete(self, vm_id: str) -> None:
        vm = self.record.vm(vm_id)
        if vm.state == "lost":
            self.record.forget(vm.vm_id)
        elif vm.state == "pending":
            raise RecordConflict(f"VM {vm_id}", f"still being placed on host {vm.host}: delete it once it is")
        else:
            self.agents.call(vm.host, "destroy", vm.vm_id)

    def viewer(self, vm_id: str) -> dict[str, Any]:
        """The host's viewer link (its URL on the host's own address: the app puts the front's in)."""
        vm = self.record.vm(vm_id)
        if vm.state != "running":
            raise RecordConflict(f"VM {vm_id}", f"{vm.state} on host {vm.host}: no viewer")
        reply: dict[str, Any] = self.agents.call(vm.host, "viewer", vm.vm_id)
        return {**reply, "vm_id": vm.vm_id}

    # --- hosts -------------------------------------------------------------------------------------

    def hosts(self) -> list[Host]:
        return self.record.hosts()

    def drain(self, host: str) -> Host:
        self.record.drain(host)
        return self.record.host(host)

    def resume(self, host: str) -> Host:
        self.record.resume(host)
        return self.record.host(host)

    def watch(self) -> list[str]:
        """One look at the hosts' health; returns what changed (for the log)."""
        changes = []
        for host in sorted(dead_hosts(self._nodes())):
            if self.record.mark_suspect(host, "its Ray node is dead (Ray's health check)"):
                changes.append(f"host {host}: suspect (its Ray node is dead)")
        changes += [f"host {host}: lost (no heartbeat for {self.grace} s)"
                    for host in self.record.sweep(silence=self.silence, grace=self.grace)]
        return changes
