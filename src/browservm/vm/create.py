"""Creating a VM: a request checked, its record written, then its steps run in order in a task of
the manager's own.

    images                                      the kernel and golden image (built the first time)
    net.lease  net.tap  disk.clone  vmm.spawn   resources: CREATE_STEPS, each undone by release.py
    guest.network ... desktop.complete          readiness (bringup.py)

Each resource step is blocking and runs in a thread to its end even when the create is cancelled,
and writes what it made into the record before it returns: the record, saved as each step passes,
is the durable list of what to undo, and the undo is the one release path (release.py), whether
the create failed, was cancelled or the VM is destroyed later.

A VM is made from a template (templates.py): its image, its size unless the request gives one, its
desktop path. A ready VM from its template's warm pool comes first when there is one; a restore from the snapshot of the
VM's inputs next (snapshotting.py); else a cold boot. A cold boot whose guest KVM stopped is tried
once more under TCG (`--accel auto`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from browservm.errors import InvalidInput, ProbeFailed, StateConflict, StateError, VmmError
from browservm.faults import crash_point
from browservm.guest.bootargs import BootArgs, build_boot_args
from browservm.ids import new_vm_id
from browservm.images.disk import clone_sparse
from browservm.names import is_name
from browservm.templates import DEFAULT, Template
from browservm.vm import config_disks, hops
from browservm.vm.bringup import BringUp
from browservm.vm.console import MAX_DISK
from browservm.vm.desktop_path import desktop_path
from browservm.vm.failures import evidence
from browservm.vm.image_source import Images, ImageSources
from browservm.vm.parts import ManagerParts, StageCallback
from browservm.vm.pool import POOL_USER, WarmPool
from browservm.vm.records import OPERATORS, PERSISTENT, Owner, Purpose, VmRecord
from browservm.vm.release import UNDO_DIRECTORY, UNDO_LEASE, UNDO_TAP, UNDO_VMM, Release
from browservm.vm.snapshots import Snapshot
from browservm.vm.snapshotting import Snapshotting
from browservm.vm.specs import VmSpecs
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import uninterrupted
from browservm.vmdir import VmDirectory, vm_directories

log = logging.getLogger(__name__)

SNAPSHOT_USER = "browservm-snapshot"  # whose VM a snapshot is made of
# What no request may name its user (compared after normalise_user): the controller's own VMs'.
RESERVED_USERS: dict[Purpose, str] = {"pool": POOL_USER, "snapshot": SNAPSHOT_USER}
# Extra kernel arguments a request may add: ones that tune, never ones that choose what runs.
EXTRA_BOOT_ARGS = frozenset({"loglevel", "printk.time", "random.trust_cpu", "clocksource", "tsc",
                             "no_timer_check", "mitigations", "systemd.show_status"})


def normalise_user(user: str) -> str:
    """One spelling per person: NFKC, case-folded, without surrounding spaces, so "Ann", " ann " and
    the same letters in full width share one per-user limit."""
    return unicodedata.normalize("NFKC", user).strip().casefold()


@dataclass(frozen=True)
class Step:
    """A resource step of a create: blocking; `undo` names the part of a release that removes what it made."""

    name: str  # its hop
    work: Callable[[], None]
    undo: str


class Creator:
    def __init__(self, parts: ManagerParts, images: ImageSources, specs: VmSpecs, release: Release,
                 bringup: BringUp, *, snapshotting: Snapshotting, pools: dict[str, WarmPool],
                 restore_by_default: bool, templates: Callable[[str], Template],
                 end: Callable[[str, str], Awaitable[bool]]) -> None:
        self._parts = parts
        self._images = images
        self._specs = specs
        self._release = release
        self._bringup = bringup
        self._snapshotting = snapshotting
        self.pools = pools  # by template: where start() takes a ready VM of that template from first
        self.restore_by_default = restore_by_default  # start(): restore from a snapshot unless told otherwise
        self._templates = templates  # a template by name (InvalidInput naming `template` when there is none)
        self.creating: dict[str, asyncio.Task[VmRecord]] = {}
        self._end = end  # ends a VM on purpose (VMManager.destroy), saying why

    async def start(self, user: str, vcpus: int | None, mem_mib: int | None, *, keep_failed: bool,
                    extra_boot_args: tuple[str, ...], on_stage: StageCallback | None, restore: bool | None,
                    purpose: Purpose, owner: Owner = OPERATORS,
                    template: str = DEFAULT) -> tuple[VmRecord, asyncio.Task[VmRecord]]:
        """VMManager.start's work: see there."""
        parts = self._parts
        made_from = self._templates(template)
        vcpus = made_from.vcpus if vcpus is None else vcpus
        mem_mib = made_from.mem_mib if mem_mib is None else mem_mib
        self.check_request(user, vcpus, mem_mib, extra_boot_args, reserved_ok=purpose != "user")
        user = normalise_user(user) if purpose == "user" else RESERVED_USERS[purpose]
        plain = not extra_boot_args and not keep_failed
        ours = purpose != "user"  # the pool's own VMs and the one a snapshot is made of
        pool = self.pools.get(template)
        if owner.profile == PERSISTENT and parts.profiles is None:
            raise InvalidInput("profile", owner.profile, "this controller keeps no browser profiles (they need "
                                                         "`browservm serve`)")
        if owner.profile == PERSISTENT and not made_from.has_browser:
            raise InvalidInput("profile", owner.profile, f"template {template!r} has no browser to keep a profile of")
        if pool is not None and not ours and plain and pool.fits(vcpus, mem_mib):
            claimed = await pool.claim(user, owner)
            if claimed is not None and await self._profile_into_claimed(claimed, on_stage):
                parts.notices.change(claimed, "ready")
                return claimed, parts.own(_already(claimed))
        restore = self.restore_by_default if restore is None else restore
        vm_id = new_vm_id()
        record = VmRecord(vm_id=vm_id, user=user, vcpus=vcpus, mem_mib=mem_mib, keep=keep_failed,
                          directory=str(parts.directory(vm_id).path), driver=parts.driver.name, owner=parts.me,
                          desktop_path=desktop_path(made_from.desktop_path).name, in_pool=purpose == "pool",
                          template=template)
        owner.apply(record, record.created_at)
        restore = restore and plain
        if restore and self._images.of(made_from).known:  # decided now, so that the answer says how it starts
            await self._snapshotting.use_snapshot(record)
            restore = False
        elif restore:
            # Decided once the kernel and image are known; the snapshot is started now all the same, or a
            # create deleted before its images were resolved would leave the host without one.
            self._snapshotting.make_in_background(vcpus, mem_mib, template)
        # The pool holds as many VMs as its settings say, whatever the limit of one person.
        limits = parts.limits
        per_user = limits.max_vms if record.in_pool else limits.max_vms_per_user
        await uninterrupted(partial(parts.records.insert, record, max_total=limits.max_vms, max_per_user=per_user,
                                    quota=owner.quota))
        crash_point("record:done")
        task = parts.own(self._create(dataclasses.replace(record), extra_boot_args, restore,
                                      on_stage or (lambda stage, seconds: None)))
        self.creating[vm_id] = task
        task.add_done_callback(lambda _: self.creating.pop(vm_id, None))
        return record, task

    def check_request(self, user: str, vcpus: int, mem_mib: int, extra_boot_args: tuple[str, ...] = (), *,
                      reserved_ok: bool = False) -> None:
        """Refuse bad input (InvalidInput naming the field) before anything is allocated."""
        if not is_name(user):
            raise InvalidInput("user", user, "must be 1-64 characters, not only spaces, without control characters")
        if not reserved_ok and normalise_user(user) in RESERVED_USERS.values():
            raise InvalidInput("user", user, "is reserved for the controller's own VMs (the warm pool's, "
                                             "the snapshot maker's)")
        limits = self._parts.limits
        for field, value, (low, high), unit in (("vcpus", vcpus, limits.vcpus, ""),
                                                ("mem_mib", mem_mib, limits.mem_mib, " MiB")):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInput(field, value, "must be a whole number")
            if not low <= value <= high:
                raise InvalidInput(field, value, f"must be between {low} and {high}{unit}")
        build_boot_args(BootArgs(ip=None, extra=extra_boot_args))
        for word in extra_boot_args:
            key = word.partition("=")[0]
            if not (key in EXTRA_BOOT_ARGS or key.startswith("browservm.")):
                raise InvalidInput("extra", word, "not an allowed extra kernel argument (allowed: browservm.*, "
                                                  f"{', '.join(sorted(EXTRA_BOOT_ARGS))}): the rest could change "
                                                  "what boots (init=, root=, rw, --, a debug shell) or hide it")

    async def _create(self, record: VmRecord, extra_boot_args: tuple[str, ...], restore: bool,
                      report: StageCallback) -> VmRecord:
        """`restore`: choose a snapshot here, once the kernel and image are known."""
        await self._bringup.finish(record, self._bring_up(record, extra_boot_args, restore, report))
        return record

    async def _bring_up(self, record: VmRecord, extra_boot_args: tuple[str, ...], restore: bool,
                        report: StageCallback) -> None:
        images = await self._images.of(self._templates(record.template)).for_vm(record)
        if restore:
            await self._snapshotting.use_snapshot(record)
        snapshot = (await asyncio.to_thread(self._snapshotting.snapshots.get, record.snapshot)
                    if record.snapshot else None)
        if record.snapshot and snapshot is None:
            raise VmmError(record.vm_id, "restore", f"snapshot {record.snapshot} is gone")
        for step in self.steps(record, images, snapshot, extra_boot_args):
            await uninterrupted(step.work)
            await self._bringup.passed(record, step.name, report)
        try:
            await self._bringup.readiness(record, report)
        except ProbeFailed as exc:
            if not await self._retry_under_tcg(record, images, extra_boot_args, exc, report):
                raise
            await self._bringup.readiness(record, report)
        if record.profile == PERSISTENT:
            await self._load_profile(record, report)

    async def _load_profile(self, record: VmRecord, report: StageCallback) -> None:
        assert self._parts.profiles is not None  # start() refuses a profile without them
        await self._parts.profiles.load(record)
        # Chromium, started again with the profile, draws its window some seconds after it says it runs.
        await self._bringup.browser_painted(record, hops.PROFILE_LOAD)
        await self._bringup.passed(record, hops.PROFILE_LOAD, report)

    async def _profile_into_claimed(self, record: VmRecord, on_stage: StageCallback | None) -> bool:
        """Load the user's profile into a VM just claimed from the pool (it runs Chromium with an empty one);
        False, and the VM ended, if that failed: the user gets a new VM instead, which loads it at its start."""
        if record.profile != PERSISTENT:
            return True
        try:
            await self._load_profile(record, on_stage or (lambda stage, seconds: None))
        except (ProbeFailed, StateConflict) as exc:
            log.warning("warm pool: %s claimed, but the profile could not be loaded into it: %s", record.vm_id, exc)
            await self._end(record.vm_id, f"the user's profile could not be loaded into it: {exc}")
            return False
        return True

    def steps(self, record: VmRecord, images: Images, snapshot: Snapshot | None,
              extra_boot_args: tuple[str, ...]) -> list[Step]:
        """The resource steps, in order. Each writes what it made into the record before it returns, so
        a cancellation that waits for it knows what to release."""
        spawn = (partial(self._spawn, record, images, extra_boot_args) if snapshot is None
                 else partial(self._snapshotting.restore, record, images, snapshot))
        return [Step(hops.NET_LEASE, partial(self._lease, record), UNDO_LEASE),
                Step(hops.NET_TAP, partial(self._add_tap, record), UNDO_TAP),
                Step(hops.DISK_CLONE, partial(self._clone_disk, record, images, snapshot), UNDO_DIRECTORY),
                Step(hops.VMM_SPAWN, spawn, UNDO_VMM)]

    def _lease(self, record: VmRecord) -> None:
        # The template's egress policy goes with the lease: the VM's port is set up, and put back, with it.
        lease = self._parts.ipam.lease(record.vm_id, egress=self._templates(record.template).egress)
        record.address, record.gateway = str(lease.address), str(lease.gateway)
        record.tap, record.mac, record.bridge = lease.tap, lease.mac, lease.bridge

    def _add_tap(self, record: VmRecord) -> None:
        lease = self._parts.ipam.get(record.vm_id)
        if lease is None or str(lease.address) != record.address:
            raise StateError(record.vm_id, f"its lease is gone or changed (record: {record.address})")
        self._parts.network.add_tap(lease)

    def _clone_disk(self, record: VmRecord, images: Images, snapshot: Snapshot | None = None) -> None:
        source = images.disk_template if snapshot is None else snapshot.overlay  # the disk as it was then
        files = VmDirectory(Path(record.directory))
        files.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._check_room(source.stat().st_size)
        files.path.mkdir(mode=0o700)
        clone_sparse(source, files.overlay)

    def _check_room(self, disk_size: int) -> None:
        """Refuse a VM whose disk could not fill up once every VM's disk is full (a sparse copy takes
        room only as the guest writes): guests fill their own disks, never the host's."""
        vm_root = self._parts.vm_root
        owed = 0
        for files in vm_directories(vm_root):
            try:
                st = files.overlay.stat()
            except FileNotFoundError:
                continue  # released meanwhile, or not cloned yet
            owed += max(0, st.st_size - st.st_blocks * 512) + MAX_DISK  # and its console
        usage = os.statvfs(vm_root)
        free = usage.f_bavail * usage.f_frsize
        needed = owed + disk_size + MAX_DISK
        if needed > free:
            raise OSError(errno.ENOSPC, f"No space left on device for this VM's disk: {free / 2**30:.1f} GiB free, "
                                        f"the VMs' disks may still grow by {owed / 2**30:.1f} GiB and this one by "
                                        f"{disk_size / 2**30:.1f} GiB (a smaller BROWSERVM_DISK_MIB, or fewer VMs)",
                          str(vm_root))

    def _spawn(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...]) -> None:
        parts = self._parts
        spec = self._specs.of(record, images, extra_boot_args)
        assert spec.config_disk is not None
        config_disks.write_cold(spec.config_disk, record.vm_id)
        accel = parts.driver.accel(spec.kernel)
        record.accel, record.accel_reason = accel.name, accel.reason
        vmm = parts.driver.start(spec, parts.network.netns)
        record.pid, record.pid_start_time = vmm.pid, vmm.start_time
        crash_point("vmm.spawn:unrecorded")
        if record.state == VmState.CREATING:  # a retry under TCG spawns a booting VM's VMM again
            record.state = transition(record.vm_id, record.state, VmState.BOOTING)

    async def _retry_under_tcg(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...],
                               exc: ProbeFailed, report: StageCallback) -> bool:
        """After KVM stopped a cold-booted guest (under --accel auto): stop choosing KVM for its kernel,
        start the VM's VMM again under TCG on a fresh disk, and say so in the record; False when that
        does not apply (another failure, not KVM, a retry already, an accelerator set by hand)."""
        parts = self._parts
        if exc.hop not in (hops.VMM_STOPPED, hops.GUEST_STALLED) or record.accel != "kvm" or record.retried_after:
            return False
        if not await uninterrupted(partial(parts.driver.demote_accel, images.kernel,
                                           f"a guest of this kernel stopped under KVM ({exc.hop}: {exc.reason})")):
            return False
        console, vmm_log = await uninterrupted(partial(evidence, record))
        record.retried_after = {"accel": record.accel, "hop": exc.hop, "reason": exc.reason,
                                "stages": dict(record.stages), "evidence": list(console), "vmm_log": list(vmm_log)}
        log.warning("%s: %s: %s; trying again under TCG", record.vm_id, exc.hop, exc.reason)

        def start_over() -> None:
            self._release.stop_vmm(record)
            parts.driver.release(record.vm_id)
            files = VmDirectory(Path(record.directory))
            for path in (files.overlay, files.config_disk, files.console_log, files.vmm_log):
                path.unlink(missing_ok=True)
            clone_sparse(images.disk_template, files.overlay)

        await uninterrupted(start_over)
        record.pid = record.pid_start_time = None
        for stage in (hops.VMM_SPAWN, *hops.READINESS):
            record.stages.pop(stage, None)
        await uninterrupted(partial(parts.records.save, record))
        parts.notices.note(record, "retry", f"{exc.hop}: {exc.reason}; trying once more under TCG")
        await uninterrupted(partial(self._spawn, record, images, extra_boot_args))
        await self._bringup.passed(record, hops.VMM_SPAWN, report)
        return True


async def _already(record: VmRecord) -> VmRecord:
    return record
