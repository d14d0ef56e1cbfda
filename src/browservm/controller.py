"""Putting the parts together from settings: the one place that knows how they connect."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from browservm.config import Settings
from browservm.errors import AlreadyServed, InvalidInput, StateError
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.images.disk import DiskTemplates
from browservm.images.kernel_build import WITH_IP_PNP, KernelBuilder
from browservm.images.rootfs import RootfsBuilder
from browservm.ipam import Ipam
from browservm.netplan import NetworkPlan
from browservm.progress import Progress
from browservm.runner import CommandRunner
from browservm.secretfile import check_state_dir
from browservm.store import Store
from browservm.templates import DEFAULT, Template, Templates, default_template, templates_for
from browservm.vm.image_source import Images
from browservm.vm.manager import VMManager
from browservm.vm.parts import Deadlines, Limits
from browservm.vm.pool import OVERHEAD_MIB, PoolManager, PoolSettings, WarmPool
from browservm.vm.records import VmRecords
from browservm.vmm.driver import choose_driver
from browservm.vmm.firecracker import JailerOptions


def plan_for(settings: Settings) -> NetworkPlan:
    return NetworkPlan.build(settings.subnet, settings.bridge, settings.uplink, settings.guest_ports,
                             egress_allow=settings.egress_allow, egress_deny=settings.egress_deny)


def host_network(settings: Settings, store: Store) -> HostNetwork:
    return HostNetwork(plan_for(settings), store, NetworkNamespace(settings.netns), tap_owner=settings.vmm_ids,
                       adopt_bridge=settings.adopt_bridge)


def resolve_images(settings: Settings, progress: Progress, template: Template | None = None) -> Images:
    """The kernel, golden image (the template's; default: the settings') and disk template to boot: given,
    or built (and cached) now."""
    template = template or default_template(settings)
    runner = CommandRunner()
    kernel = settings.kernel
    if kernel is None:
        kernel = KernelBuilder.packaged(runner, progress).build(WITH_IP_PNP).vmlinux
    rootfs = template.rootfs
    if rootfs is None:
        assert template.image_profile is not None  # a template has one or the other
        rootfs = RootfsBuilder(runner, progress).build(template.image_profile).path
    disk = DiskTemplates(runner, progress).template(settings.disk_mib)
    return Images(kernel=kernel, rootfs=rootfs, disk_template=disk)


@dataclass
class Controller:
    settings: Settings
    store: Store
    network: HostNetwork
    manager: VMManager


@contextmanager
def open_controller(settings: Settings, progress: Progress | None = None,
                    deadlines: Deadlines | None = None, *, serving: bool = False) -> Iterator[Controller]:
    """`serving`: for `browservm serve`, whose service runs the warm pool (settings.pool); a local
    command's manager has none."""
    progress = progress or Progress()
    templates = templates_for(settings)
    check_pools(settings, templates)
    with Store(settings.database) as store, host_network(settings, store) as network:
        plan = network.plan
        manager = VMManager(
            records=VmRecords(store), ipam=Ipam(store, plan), network=network,
            driver=choose_driver(settings.vmm, jailer=jailer_options(settings), accel=settings.accel),
            images=lambda template, report: resolve_images(settings, progress.observed(report), template),
            vm_root=settings.state_dir / "vms",
            limits=Limits(max_vms=settings.max_vms, max_vms_per_user=settings.max_vms_per_user),
            deadlines=deadlines,
            # Only root can hand a VMM another uid; a controller that is not root runs VMMs as itself.
            vm_uid_base=settings.vm_uid_base if settings.vm_uids and os.geteuid() == 0 else None,
            templates=templates, restore_by_default=settings.snapshots or settings.pooling,
            pool=warm_pools(settings, templates, store) if serving else None)
        yield Controller(settings, store, network, manager)


def check_pools(settings: Settings, templates: Templates) -> None:
    """Every pool names a template there is (InvalidInput naming `pool`)."""
    for name in settings.pool:
        if name not in templates:
            raise InvalidInput("pool", name, f"no such template (known: {', '.join(templates.names())})")


def pool_settings(settings: Settings, templates: Templates) -> list[PoolSettings]:
    """A pool per template that has one. The default template's VMs are of pool_vm_mib (as before
    templates), the others' of their template's size; pool_memory_mib bounds them all together: each
    pool gets what the pools named before it leave."""
    made = []
    left = settings.pool_memory_mib
    for name, size in settings.pool.items():
        template = templates.get(name)
        vcpus, mem_mib = (1, settings.pool_vm_mib) if name == DEFAULT else (template.vcpus, template.mem_mib)
        pool = PoolSettings(size=size, max_age=settings.pool_max_age, memory_mib=left, vcpus=vcpus, mem_mib=mem_mib,
                            template=name)
        left -= pool.target * (mem_mib + OVERHEAD_MIB)
        made.append(pool)
    return made


def warm_pools(settings: Settings, templates: Templates,
               store: Store) -> Callable[[PoolManager], list[WarmPool]] | None:
    """The warm pools the manager takes ready VMs from first, made by the manager (given itself): None
    without one."""
    if not settings.pooling:
        return None

    def pools(manager: PoolManager) -> list[WarmPool]:
        return [WarmPool(manager, VmRecords(store), one, max_per_user=lambda: settings.max_vms_per_user)
                for one in pool_settings(settings, templates)]
    return pools


def jailer_options(settings: Settings) -> JailerOptions | None:
    if not settings.jailer:
        return None
    uid, gid = settings.vmm_ids
    # Beside the state directory: hard links into the jail need the images on the same file system.
    return JailerOptions(uid=uid, gid=gid, chroot_base=settings.state_dir / "jail")


class ServeLock:
    """Only one controller serves a state directory: an exclusive lock held for the controller's life.

    The kernel drops the lock when the process ends, however it ends, so a crashed controller
    never blocks the next one. The file names the holder's PID for the refusal message.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "serve.lock"
        self._fd = -1

    def __enter__(self) -> ServeLock:
        # Root truncates and writes this file: in a state directory another user controls, a link put
        # here would have it overwrite any file of the host (issue 18). So: the directory is checked,
        # and a link is refused, never followed.
        check_state_dir(self.path.parent)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StateError(str(self.path), f"cannot open the serve lock: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise AlreadyServed(str(self.path.parent), int(holder) if holder.isdigit() else None) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        os.close(self._fd)  # the lock goes with the descriptor
