"""Snapshots made of a booted desktop, and VMs restored from them.

A snapshot (vm/snapshots.py keeps them) is made of a VM booted until its browser is on screen and
then idle, one at a time; the VM it was made of is gone after. A create with `restore` starts from
the snapshot of its inputs when there is one; without one it boots cold while the snapshot is made
in the background. Snapshots are keyed by the image's files, the VMM's inputs and the size, so each
template's VMs restore from their own. A restored VM's VMM resumes offline and the guest takes this VM's identity from
its config disk (guest/identity.py) before readiness brings its link up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Protocol

from browservm.errors import BrowserVMError, ProbeFailed, VmmError
from browservm.images.disk import clone_sparse
from browservm.templates import DEFAULT, Template
from browservm.vm import config_disks
from browservm.vm.image_source import Images, ImageSources
from browservm.vm.parts import ManagerParts
from browservm.vm.records import Purpose, VmRecord
from browservm.vm.snapshots import STATE, Snapshot, Snapshots
from browservm.vm.specs import VmSpecs
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import uninterrupted
from browservm.vmdir import OVERLAY, VmDirectory
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec

log = logging.getLogger(__name__)


class VmMaker(Protocol):
    """What making a snapshot needs of the manager: a VM to take it of, and that VM gone after."""

    async def create(self, user: str = ..., vcpus: int | None = ..., mem_mib: int | None = ..., *,
                     restore: bool | None = ..., purpose: Purpose = ..., template: str = ...) -> VmRecord: ...

    async def destroy(self, vm_id: str, *, ended_reason: str = ...) -> bool: ...


class Snapshotting:
    def __init__(self, parts: ManagerParts, images: ImageSources, specs: VmSpecs, snapshots: Snapshots,
                 vms: VmMaker, *, templates: Callable[[str], Template]) -> None:
        self._parts = parts
        self._images = images
        self._templates = templates  # a template by name (InvalidInput when there is none)
        self._specs = specs
        self.snapshots = snapshots
        self._vms = vms
        self._lock = asyncio.Lock()  # one snapshot made at a time

    async def _key(self, vcpus: int, mem_mib: int, template: str) -> tuple[str, dict[str, str]]:
        images = await self._images.of(self._templates(template)).images()
        # Per-VM values do not matter: the driver blanks them (snapshot_inputs).
        spec = VmSpec.placeholder("vm", Path("/vm"), vcpus=vcpus, mem_mib=mem_mib, kernel=images.kernel,
                                  rootfs=images.rootfs)
        vmm = await asyncio.to_thread(self._parts.driver.snapshot_inputs, spec)
        return await asyncio.to_thread(self.snapshots.key, images.kernel, images.rootfs, vcpus, mem_mib, vmm)

    async def snapshot_of(self, vcpus: int = 1, mem_mib: int = 1024, template: str = DEFAULT) -> Snapshot | None:
        """The snapshot made with today's inputs for VMs of this size and template's image, if there is one."""
        key, _ = await self._key(vcpus, mem_mib, template)
        return await asyncio.to_thread(self.snapshots.get, key)

    async def snapshot(self, vcpus: int = 1, mem_mib: int = 1024, template: str = DEFAULT) -> Snapshot:
        """The snapshot for VMs of this size: made now, from a VM booted until its browser is on
        screen, unless one exists for today's inputs. One at a time; the VM it was made of is gone after."""
        async with self._lock:
            key, inputs = await self._key(vcpus, mem_mib, template)
            found = await asyncio.to_thread(self.snapshots.get, key)
            if found is not None:
                return found
            # Booted: what a snapshot is of.
            record = await self._vms.create(vcpus=vcpus, mem_mib=mem_mib, restore=False, purpose="snapshot",
                                            template=template)
            if record.state != VmState.READY:
                failure = record.failure
                raise VmmError(record.vm_id, "snapshot", f"the VM to snapshot failed at "
                                                         f"{failure.hop if failure else '?'}: "
                                                         f"{failure.reason if failure else ''}")
            staged = await asyncio.to_thread(self.snapshots.staging, key)
            try:
                await self._settled(record)  # its browser painted: its readiness waited for that
                spec = self._specs.of(record, await self._images.of(self._templates(template)).images())
                await uninterrupted(partial(self._parts.driver.save, spec, staged / STATE))
                await uninterrupted(partial(clone_sparse, VmDirectory(Path(record.directory)).overlay,
                                            staged / OVERLAY))
                return await asyncio.to_thread(self.snapshots.publish, staged, key, inputs, record.vm_id)
            except BaseException:
                await asyncio.to_thread(self.snapshots.discard, staged)
                raise
            finally:
                await self._vms.destroy(record.vm_id)

    async def _settled(self, record: VmRecord) -> None:
        """Wait until the VM is idle. Chromium goes on starting for some 15 s (under emulation) after it
        painted: a snapshot taken then makes every clone do that work again, at a whole CPU, just when
        its user arrives (measured: a clone took 17 s to settle, its first viewer waited over 1 s)."""
        assert record.pid is not None and record.pid_start_time is not None
        try:
            share = await self._parts.probes.settled(VmmProcess(record.pid, record.pid_start_time),
                                                     self._parts.deadlines.settle)
        except TimeoutError as exc:
            log.warning("snapshot of %s taken busy: %s", record.vm_id, exc)  # slower clones, not wrong ones
            return
        except ProbeFailed as exc:
            raise VmmError(record.vm_id, "snapshot", f"the VM to snapshot stopped: {exc.reason}") from exc
        log.info("snapshot of %s: the VM is idle (%.0f%% of a CPU)", record.vm_id, share * 100)

    async def _snapshot_quietly(self, vcpus: int, mem_mib: int, template: str) -> None:
        """Make the snapshot in the background; a failure is logged, and VMs keep booting cold."""
        try:
            await self.snapshot(vcpus, mem_mib, template)
        except (BrowserVMError, OSError) as exc:
            log.warning("snapshot for %d vCPU / %d MiB VMs of template %s: %s", vcpus, mem_mib, template, exc)

    async def use_snapshot(self, record: VmRecord) -> None:
        """Restore the VM from the snapshot of its inputs, if there is one; else it boots cold while the
        snapshot is made in the background."""
        snapshot = await self.snapshot_of(record.vcpus, record.mem_mib, record.template)
        if snapshot is not None:
            record.started_from, record.snapshot = "restored", snapshot.key
        else:
            self.make_in_background(record.vcpus, record.mem_mib, record.template)

    def make_in_background(self, vcpus: int, mem_mib: int, template: str = DEFAULT) -> None:
        """Start making the snapshot for VMs of this size, unless one is being made; a task of the
        manager's own, so it goes on whatever becomes of the create that asked for it."""
        if not self._lock.locked():
            self._parts.own(self._snapshot_quietly(vcpus, mem_mib, template))

    def restore(self, record: VmRecord, images: Images, snapshot: Snapshot) -> None:
        """vmm.spawn for a VM from a snapshot: the VMM resumes offline, and the guest takes this VM's
        identity from its config disk (guest/identity.py) before readiness brings its link up. Blocking."""
        parts = self._parts
        spec = self._specs.of(record, images)
        assert spec.config_disk is not None
        before_resume = config_disks.write_restored(spec.config_disk, record)
        accel = parts.driver.accel(spec.kernel)
        record.accel, record.accel_reason = accel.name, accel.reason
        if not parts.driver.holds_link:  # it wakes as the VM it was taken of: keep that off the bridge
            parts.network.set_tap_up(record.tap, False)
        vmm = parts.driver.restore(spec, parts.network.netns, snapshot.state, before_resume)
        record.pid, record.pid_start_time = vmm.pid, vmm.start_time
        record.state = transition(record.vm_id, record.state, VmState.BOOTING)

    async def link_up(self, record: VmRecord) -> None:
        """Connect a restored VM to its bridge: through its VMM, or by its TAP where the VMM cannot."""
        images = await self._images.of(self._templates(record.template)).images()
        await uninterrupted(partial(self._link_up, record, images))

    def _link_up(self, record: VmRecord, images: Images) -> None:
        if self._parts.driver.holds_link:
            self._parts.driver.link_up(self._specs.of(record, images))
        else:
            self._parts.network.set_tap_up(record.tap, True)
