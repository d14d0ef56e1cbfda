"""The doctor: the investigation of the incident done by the program, read-only and bounded.

    host   host.netns host.bridge host.forwarding host.firewall host.uplink   the VM network (host_network.py)
           host.vmm host.kernel host.image                     what VMs would boot with (host_boot.py)
    VM     the host network pieces, then the VM's hops in order (vm_walk.py, names from vm/hops.py):
           vmm.spawn net.tap guest.network net.arp desktop.ready net.tcp ws.upgrade rfb.banner
           desktop.complete

The host pieces are all checked; the VM walk stops at the first failing hop (later ones are
`skipped`). The verdict is the first failure in that order, with its cause code (causes.py).

Read-only: netlink dumps, /proc, `nft -j list ruleset`, `debugfs` without -w, the console file,
and the readiness probes' own packets (ARP requests from the bridge, TCP connects from the VM
namespace). Bounded: every step has a deadline, and blocking work runs in daemon threads
(deadlines.py), so a hung `nft` or netlink call costs its deadline and never holds up the answer
or the process exit.
"""

from __future__ import annotations

import asyncio
import time

from browservm.doctor.deadlines import Deadlines, DoctorTimeout
from browservm.doctor.host_boot import BootChecks
from browservm.doctor.host_network import NetworkPieces
from browservm.doctor.report import Report
from browservm.doctor.sources import Sources
from browservm.doctor.vm_walk import VmWalk
from browservm.errors import BrowserVMError, VmNotFound
from browservm.ids import validate_vm_id
from browservm.vm.records import VmRecord


class Doctor:
    def __init__(self, sources: Sources, deadlines: Deadlines | None = None) -> None:
        self._s = sources
        self._d = deadlines or Deadlines()
        self._network = NetworkPieces(self._s, self._d)
        self._boot = BootChecks(self._s, self._d)

    async def host(self) -> Report:
        """Every piece the VMs depend on, and what a VM would boot with."""
        started = time.monotonic()
        state, vmm, images = await asyncio.gather(self._network.read(), self._boot.vmm(), self._boot.images())
        results = [*self._network.judge(state, for_vm=False), vmm, *images]
        return Report("host", None, results, time.monotonic() - started)

    async def vm(self, vm_id: str) -> Report:
        """Walk one VM's hops in order, from its record, its console and live probes."""
        started = time.monotonic()
        validate_vm_id(vm_id)
        if self._s.record is None:
            raise VmNotFound(vm_id)
        try:
            async with asyncio.timeout(self._d.host):
                record = await self._s.record(vm_id)
        except TimeoutError:
            raise DoctorTimeout("reading the VM's record", self._d.host) from None
        if record is None:
            raise VmNotFound(vm_id)
        state, others = await asyncio.gather(self._network.read(), self._other_records())
        pieces = self._network.judge(state, for_vm=True)
        walk = VmWalk(self._s, self._d, self._boot, record=record, host=state, others=others)
        return Report("vm", vm_id, pieces + await walk.run(), time.monotonic() - started)

    async def _other_records(self) -> list[VmRecord]:
        if self._s.records is None:
            return []
        try:
            async with asyncio.timeout(self._d.host):
                return await self._s.records()
        except (TimeoutError, BrowserVMError, OSError):
            return []  # only for conflicts between records: the walk goes on without them
