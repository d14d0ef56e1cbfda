"""VMManager: creates, finds, watches and destroys browser VMs; a façade over one module per concern.

    create.py        a request checked, its record written, its resource steps run (each undone by release)
    bringup.py       readiness: the hops from a running VMM to a desktop that answers; ready, or failed
    release.py       the one way a VM's resources go (a failure, a cancellation, a destroy, a reconcile)
    failures.py      a failure recorded one way, whoever finds it, with the console's and VMM log's last lines
    snapshotting.py  snapshots made of a booted desktop, and VMs restored from them
    watcher.py       a VMM's exit marks its VM failed at once; a creator's death has its VM taken over
    reconcile.py     after a (re)start: every VM settled, orphans of ours removed
    image_source.py  the kernel and each template's image, built the first time, each step told
    config_disks.py  the secrets and identity on a VM's config disk
    parts.py         what they all share: the host's pieces, deadlines, probes, notices, this process's identity

Built to live inside a long-running server that serves many requests at once:

- Nothing blocks the event loop. Every blocking step (SQLite, netlink, files, spawning, the KVM
  probe, image resolution) runs in a thread, and runs to its end even when the create is
  cancelled, so what it made is known and undone.
- Every record write is a compare-and-set (records.py), and a record names the live process
  working on it (`owner`), so a reconcile never frees what another process is still creating,
  and a late `ready` never overwrites `failed` or a destroy.
- Every task the manager starts is its own (`close` cancels them all).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from functools import partial
from pathlib import Path

from browservm.errors import BrowserVMError, StateConflict, VmmError
from browservm.faults import crash_point
from browservm.ids import validate_vm_id
from browservm.ipam import Ipam
from browservm.progress import BuildStep
from browservm.templates import DEFAULT, Template, Templates
from browservm.vm import config_disks, hops
from browservm.vm.bringup import BringUp
from browservm.vm.console import ConsoleLog, cap_console
from browservm.vm.create import Creator
from browservm.vm.desktop_path import RFB, DesktopPath
from browservm.vm.desktop_path import desktop_path as desktop_path_named
from browservm.vm.failures import Failures
from browservm.vm.image_source import Images, ImageSources
from browservm.vm.parts import Deadlines, Limits, ManagerParts, Notices, ProfileLink, StageCallback, VmNetwork
from browservm.vm.pool import PoolManager, WarmPool
from browservm.vm.readiness import GuestProbes, Probes
from browservm.vm.reconcile import Reconciler
from browservm.vm.records import OPERATORS, Owner, Purpose, VmRecord, VmRecords
from browservm.vm.release import Release
from browservm.vm.snapshots import Snapshot, Snapshots
from browservm.vm.snapshotting import Snapshotting
from browservm.vm.specs import VmSpecs
from browservm.vm.state import VmState, transition
from browservm.vm.waiting import to_the_end, uninterrupted, wait_out
from browservm.vm.watcher import Watcher
from browservm.vmdir import vm_directories
from browservm.vmm.driver import VmmDriver

log = logging.getLogger(__name__)


class VMManager:
    def __init__(self, *, records: VmRecords, ipam: Ipam, network: VmNetwork, driver: VmmDriver,
                 images: Callable[[Template, Callable[[BuildStep], None]], Images], vm_root: Path,
                 limits: Limits | None = None,
                 deadlines: Deadlines | None = None, probes: Probes | None = None,
                 vm_uid_base: int | None = None, snapshots: Snapshots | None = None,
                 desktop_path: str = RFB, restore_by_default: bool = False,
                 templates: Templates | None = None,
                 pool: Callable[[PoolManager], WarmPool | list[WarmPool]] | None = None,
                 on_change: Callable[[VmRecord, str], None] | None = None,
                 on_note: Callable[[VmRecord, str, str], None] | None = None,
                 on_failure: Callable[[VmRecord], None] | None = None) -> None:
        """`images` resolves (builds, on a new host) the kernel and a template's image, telling each step;
        `templates` are what VMs are made from (default: only `default`, of `desktop_path`); `pool` makes
        the warm pools (one per template at most) start() takes ready VMs from first, given this manager;
        `restore_by_default`: start() restores from a snapshot unless told otherwise. `on_change` is told of
        every change (a stage passed, "ready", "failed", "ended", "destroyed"), `on_note` of what a create
        waits through ("build", "retry"), `on_failure` of a dead VM marked and released."""
        self.notices = Notices(on_change, on_note, on_failure)
        self._parts = parts = ManagerParts(
            records=records, ipam=ipam, network=network, driver=driver, vm_root=vm_root,
            limits=limits or Limits(), deadlines=deadlines or Deadlines(), probes=probes or GuestProbes(),
            notices=self.notices)
        default = Template(DEFAULT, desktop_path=desktop_path_named(desktop_path).name)
        self.templates = templates or Templates.only(default)
        self._images = ImageSources(images, self.notices)
        specs = VmSpecs(driver, vm_uid_base)
        self._release = Release(parts)
        failures = Failures(parts, self._release)
        self._watcher = Watcher(parts, failures, take_over=self._take_over)
        self._snapshotting = Snapshotting(parts, self._images, specs,
                                          snapshots or Snapshots(vm_root.parent / "snapshots"), self,
                                          templates=self.template)
        bringup = BringUp(parts, failures, self._watcher, self._snapshotting.link_up)
        made = [] if pool is None else pool(self)
        self.pools: dict[str, WarmPool] = {}  # by template
        for one in made if isinstance(made, list) else [made]:
            self.template(one.settings.template)  # a pool of a template there is not: InvalidInput
            self.pools[one.settings.template] = one
        if self.pools:
            self.notices.pool_notice = self._pool_notice
        self._creator = Creator(parts, self._images, specs, self._release, bringup, snapshotting=self._snapshotting,
                                pools=self.pools, restore_by_default=restore_by_default, templates=self.template,
                                end=lambda vm_id, reason: self.destroy(vm_id, ended_reason=reason))
        self._reconciler = Reconciler(parts, self._release, failures, self._watcher, bringup)
        self._saving: dict[str, asyncio.Task[str]] = {}  # a VM's profile being saved before its end

    @property
    def profiles(self) -> ProfileLink | None:
        return self._parts.profiles

    @profiles.setter
    def profiles(self, link: ProfileLink | None) -> None:
        """Keep users' browser profiles (`profile: persistent`) with `link` (profiles/keeper.py)."""
        self._parts.profiles = link

    def _pool_notice(self, record: VmRecord, event: str) -> None:
        for pool in self.pools.values():
            pool.notice(record, event)

    @property
    def pool(self) -> WarmPool | None:
        """The default template's warm pool, if it has one."""
        return self.pools.get(DEFAULT)

    def template(self, name: str) -> Template:
        """The template of that name (InvalidInput naming `template` when there is none)."""
        return self.templates.get(name)

    async def _take_over(self, vm_id: str) -> list[str]:
        """The watcher's: a VM whose creator died, settled as a restart's reconcile would (the reconcile
        watches VMs, so it is made after the watcher)."""
        return await self._reconciler.reconcile_vm(vm_id)

    # The service is built around a manager that exists before it: it sets on_change and on_note
    # once, after (the one exception to wiring through the constructor). Tests set them too.
    @property
    def on_change(self) -> Callable[[VmRecord, str], None] | None:
        return self.notices.on_change

    @on_change.setter
    def on_change(self, listener: Callable[[VmRecord, str], None] | None) -> None:
        self.notices.on_change = listener

    @property
    def on_note(self) -> Callable[[VmRecord, str, str], None] | None:
        return self.notices.on_note

    @on_note.setter
    def on_note(self, listener: Callable[[VmRecord, str, str], None] | None) -> None:
        self.notices.on_note = listener

    @property
    def on_failure(self) -> Callable[[VmRecord], None] | None:
        return self.notices.on_failure

    @on_failure.setter
    def on_failure(self, listener: Callable[[VmRecord], None] | None) -> None:
        self.notices.on_failure = listener

    @property
    def driver(self) -> VmmDriver:
        return self._parts.driver

    @property
    def building(self) -> BuildStep | None:
        """The build step under way, while creates wait for the kernel and image."""
        return self._images.building

    def building_of(self, template: str) -> BuildStep | None:
        """The build step under way of this template's image (None for a template this controller lacks)."""
        found = self.templates.get(template) if template in self.templates else None
        return None if found is None else self._images.building_of(found)

    @property
    def snapshots(self) -> Snapshots:
        return self._snapshotting.snapshots

    @property
    def desktop_path(self) -> DesktopPath:
        """How new VMs of the default template reach their desktops (their records keep it)."""
        return desktop_path_named(self.templates.default.desktop_path)

    @desktop_path.setter
    def desktop_path(self, path: DesktopPath) -> None:
        default = self.templates.default
        self.templates = self.templates.with_default(dataclasses.replace(default, desktop_path=path.name))

    @property
    def _me(self) -> str:
        """This process as a record `owner` (tests stand in for another process by setting it)."""
        return self._parts.me

    @_me.setter
    def _me(self, me: str) -> None:
        self._parts.me = me

    async def close(self) -> None:
        """Cancel every task of the manager and wait for each to finish its cleanup; stop watching."""
        self._watcher.close()
        await self._parts.cancel_tasks()

    # --- create --------------------------------------------------------------------------

    async def create(self, user: str = "default", vcpus: int | None = None, mem_mib: int | None = None, *,
                     keep_failed: bool = False, extra_boot_args: tuple[str, ...] = (),
                     on_stage: StageCallback | None = None, restore: bool | None = None,
                     purpose: Purpose = "user", owner: Owner = OPERATORS, template: str = DEFAULT) -> VmRecord:
        """Boot a VM and return once its desktop answers, or its record says which hop failed."""
        _, task = await self.start(user, vcpus, mem_mib, keep_failed=keep_failed, extra_boot_args=extra_boot_args,
                                   on_stage=on_stage, restore=restore, purpose=purpose, owner=owner,
                                   template=template)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.cancel()  # the caller is gone: so is the VM, released as for a failure
            await wait_out(task)
            raise

    async def start(self, user: str = "default", vcpus: int | None = None, mem_mib: int | None = None, *,
                    keep_failed: bool = False, extra_boot_args: tuple[str, ...] = (),
                    on_stage: StageCallback | None = None, restore: bool | None = None,
                    purpose: Purpose = "user", owner: Owner = OPERATORS,
                    template: str = DEFAULT) -> tuple[VmRecord, asyncio.Task[VmRecord]]:
        """Check the request, write the VM's record, and boot it in a task of the manager's own.

        The VM is made from `template` (its image, desktop path, and its size where `vcpus` or `mem_mib`
        is None; InvalidInput naming `template` when there is none of that name).
        A ready VM from the template's warm pool comes first, when there is one (its task is already done).
        With `restore` (default: `restore_by_default`) the VM starts from the snapshot of its inputs;
        without one it boots cold while the snapshot is made in the background. Returns at once with
        the record (state `creating`) and the task that ends with the final one; the kernel and image
        are resolved (built, on a new host) in that task.
        `purpose` says whose VM it is: a user's (named by `user`), or the warm pool's or the snapshot
        maker's (under their reserved names, which no request may use); no request reaches it.
        A user's VM is also `owner`'s: its tenant's, within that tenant's quota, with the client's labels and timeout.
        """
        return await self._creator.start(user, vcpus, mem_mib, keep_failed=keep_failed,
                                         extra_boot_args=extra_boot_args, on_stage=on_stage, restore=restore,
                                         purpose=purpose, owner=owner, template=template)

    def check_request(self, user: str, vcpus: int, mem_mib: int, extra_boot_args: tuple[str, ...] = (), *,
                      reserved_ok: bool = False) -> None:
        """Refuse bad input (InvalidInput naming the field) before anything is allocated."""
        self._creator.check_request(user, vcpus, mem_mib, extra_boot_args, reserved_ok=reserved_ok)

    # --- snapshots -----------------------------------------------------------------------

    async def snapshot_of(self, vcpus: int = 1, mem_mib: int = 1024, template: str = DEFAULT) -> Snapshot | None:
        """The snapshot made with today's inputs for VMs of this size and template, if there is one."""
        return await self._snapshotting.snapshot_of(vcpus, mem_mib, template)

    async def snapshot(self, vcpus: int = 1, mem_mib: int = 1024, template: str = DEFAULT) -> Snapshot:
        """The snapshot for VMs of this size and template: made now unless one exists for today's inputs."""
        return await self._snapshotting.snapshot(vcpus, mem_mib, template)

    # --- a VM's files ----------------------------------------------------------------------

    def cap_consoles(self) -> dict[str, int]:
        """Keep every VM's console log within console.MAX_DISK on disk: VM id -> bytes freed. Blocking.

        A guest can print without end; without this its console would fill the host's disk.
        """
        freed = {}
        for files in vm_directories(self._parts.vm_root):
            try:
                count = cap_console(files.console_log)
            except OSError as exc:
                raise VmmError(files.vm_id, "cap console", f"{exc.filename}: {exc.strerror}") from exc
            if count:
                freed[files.vm_id] = count
        return freed

    async def new_agent_key(self, vm_id: str) -> None:
        """Give the VM's agent a new key on its config disk (a pooled VM's claim): the agent checks each
        request against the disk's key, so the new key works at once and the old one stops."""
        validate_vm_id(vm_id)
        await uninterrupted(partial(config_disks.new_agent_key, self._parts.directory(vm_id).config_disk, vm_id))

    def secrets(self, vm_id: str) -> dict[str, str]:
        """The secrets the VM's config disk carries (the agent's key, the desktop's password). Blocking."""
        return config_disks.read_secrets(self._parts.directory(validate_vm_id(vm_id)).config_disk, vm_id)

    def console(self, vm_id: str) -> ConsoleLog:
        return ConsoleLog(self._parts.directory(validate_vm_id(vm_id)).console_log)

    # --- find ----------------------------------------------------------------------------

    async def get(self, vm_id: str) -> VmRecord | None:
        validate_vm_id(vm_id)
        return await asyncio.to_thread(self._parts.records.get, vm_id)

    async def settled(self, vm_id: str) -> VmRecord | None:
        """The VM's record once a create of it in this process has ended (at once when none runs here)."""
        creating = self._creator.creating.get(vm_id)
        if creating is not None:
            await asyncio.wait({creating})  # its outcome is in the record; the create's own caller sees errors
        return await self.get(vm_id)

    async def all(self) -> list[VmRecord]:
        return await asyncio.to_thread(self._parts.records.all)

    # --- watch, destroy, reconcile -------------------------------------------------------

    async def watch_all(self) -> None:
        """Watch every VM that should be running, and the processes working on VMs, including other ones'."""
        await self._watcher.watch_all()

    def watch(self, record: VmRecord) -> None:
        """Mark the VM failed, with its console tail, the moment its VMM exits."""
        self._watcher.watch(record)

    async def destroy(self, vm_id: str, *, ended_reason: str = "") -> bool:
        """Stop the VM and remove everything it had; False when there was no such VM. Idempotent.

        With `ended_reason` (the reaper's "idle for 15 min", ...) the record stays, in state
        `ended`, to say why; without, it is deleted. A create of this VM in this process is
        cancelled first (it releases what it made); a create in another process loses its next
        compare-and-set and undoes what it made itself.
        """
        validate_vm_id(vm_id)
        creating = self._creator.creating.get(vm_id)
        if creating is not None:
            creating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait_out(creating)
        unsaved = await self._save_profile(vm_id)
        self._watcher.forget(vm_id)
        # Once marked destroying a VM is no longer live, and nothing else in this process would release it:
        # a caller cancelled meanwhile (a login's release as the controller stops) gets its cancellation after.
        return await to_the_end(self._mark_and_release(vm_id, ended_reason, unsaved))

    async def _mark_and_release(self, vm_id: str, ended_reason: str, unsaved: str) -> bool:
        records = self._parts.records
        while True:
            record = await asyncio.to_thread(records.get, vm_id)
            if record is None:
                return False
            if ended_reason and record.state == VmState.ENDED:
                return True
            record.state = transition(vm_id, record.state, VmState.DESTROYING)
            record.owner = self._parts.me
            record.ended_reason = ended_reason + (f"; {unsaved}" if ended_reason and unsaved else "")
            try:
                await asyncio.to_thread(records.save, record)
            except StateConflict:
                continue  # changed meanwhile: read it again
            break
        crash_point("destroy:marked")
        await self._release.finish_destroy(record)
        return True

    async def _save_profile(self, vm_id: str) -> str:
        """Save the browser profile of a ready VM that loaded one, before it ends (still live, so no other VM
        takes the profile meanwhile); "" when saved or there is none to save, else why it was not. One save
        per VM: a second destroy meanwhile waits for the first's."""
        record = await asyncio.to_thread(self._parts.records.get, vm_id)
        link = self._parts.profiles
        if (link is None or record is None or record.state != VmState.READY
                or hops.PROFILE_LOAD not in record.stages):
            return ""
        saving = self._saving.get(vm_id)
        if saving is None:
            saving = self._saving[vm_id] = self._parts.own(self._save_once(link, record))
            saving.add_done_callback(lambda _: self._saving.pop(vm_id, None))
        return await asyncio.shield(saving)

    async def _save_once(self, link: ProfileLink, record: VmRecord) -> str:
        try:
            await link.save(record)
        except (BrowserVMError, OSError) as exc:
            why = f"its browser profile was not saved (the one saved before is kept): {exc}"
            log.warning("%s: %s", record.vm_id, why)
            self.notices.note(record, "profile", why)
            return why
        self.notices.note(record, "profile", "its browser profile was saved")
        return ""

    async def reconcile(self) -> list[str]:
        """After a (re)start: settle every VM no live process is working on, and remove orphans of ours.

        Returns one line per thing done, for the log (reconcile.py says what is touched).
        """
        return await self._reconciler.reconcile()
