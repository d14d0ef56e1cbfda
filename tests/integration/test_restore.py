"""VMs restored from a snapshot under QEMU/TCG (minimal image): two at once from one snapshot, on one
bridge, each a VM of its own to its user and to the doctor.

What each guest says of itself comes from inside it: browservm-identity prints its hostname,
machine-id, bytes from its reseeded RNG and its clock on the console once it has taken its identity.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from browservm.doctor import Doctor
from browservm.doctor.local import sources
from browservm.guest.markers import parse_marker
from browservm.vm.console import ConsoleLog
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState

from .conftest import Controllers, run

pytestmark = [pytest.mark.host, pytest.mark.vm]


def said(record: VmRecord) -> dict[str, str]:
    """The guest's identity marker, as it printed it."""
    lines = ConsoleLog(Path(record.directory) / "console.log").tail(200)
    found = [m[1] for m in map(parse_marker, lines) if m and m[0] == "identity"]
    assert found, f"{record.vm_id} printed no identity marker: {lines[-20:]}"
    return found[-1]


def test_two_vms_restored_from_one_snapshot_are_each_their_own(controllers: Controllers) -> None:
    controller = controllers.open()
    manager = controller.manager

    async def scenario() -> tuple[float, list[VmRecord]]:
        snapshot = await manager.snapshot()
        made = time.time()
        assert snapshot.state.stat().st_size > 0 and snapshot.overlay.exists()
        clones = await asyncio.gather(manager.create("ann", restore=True), manager.create("bob", restore=True))
        return made, list(clones)

    made, clones = asyncio.run(scenario())
    for clone in clones:
        assert clone.state == VmState.READY, clone.failure
        assert clone.started_from == "restored" and clone.guest_network_by == "identity"
    a, b = clones
    assert a.mac != b.mac and a.address != b.address and a.snapshot == b.snapshot

    seen = {clone.vm_id: said(clone) for clone in clones}
    assert [seen[c.vm_id]["hostname"] for c in clones] == [a.vm_id, b.vm_id]
    assert seen[a.vm_id]["machine_id"] != seen[b.vm_id]["machine_id"]
    assert seen[a.vm_id]["random"] != seen[b.vm_id]["random"]
    for clone in clones:
        # Its clock, read when it announced its network, against the host's when the controller read that line.
        host_then = clone.created_at + clone.stages["guest.network"]
        assert abs(float(seen[clone.vm_id]["clock"]) - host_then) < 2.0, (seen[clone.vm_id], host_then, made)

    # ARP for each address is answered from that VM's MAC only (the host's neighbour table after readiness).
    neighbours = json.loads(run("ip", "-j", "neigh", "show", netns=controllers.netns).stdout)
    for clone in clones:
        macs = {n.get("lladdr") for n in neighbours if n.get("dst") == clone.address.split("/")[0]}
        assert macs == {clone.mac}, (clone.vm_id, macs)

    doctor = Doctor(sources(controller.settings, network=controller.network, records=VmRecords(controller.store)))
    for clone in clones:
        report = asyncio.run(doctor.vm(clone.vm_id)).to_json()
        assert report["verdict"] == "OK", json.dumps(report, indent=1)
