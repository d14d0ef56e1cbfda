"""Where the doctor reads from: the plan, the namespace, the store's records, `host status`, and the
running VMMs (DriverVmms, or a test's stand-in)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from browservm.doctor.vmmview import VmmView, read_vmm_view
from browservm.hostnet.expected import Expectation
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.pieces import Check
from browservm.netplan import NetworkPlan
from browservm.vm.records import VmRecord
from browservm.vmm import firecracker, process
from browservm.vmm.accel import AccelMode
from browservm.vmm.process import VmmProcess
from browservm.vmm.qemu import QEMU


class VmmInspector(Protocol):
    """How the doctor looks at a VM's VMM (DriverVmms is the real one; tests of a stand-in guest give
    their own). Blocking."""

    def alive(self, record: VmRecord) -> bool: ...

    def view(self, record: VmRecord) -> VmmView: ...


class DriverVmms:
    """The VMM as the driver recognises it (process.is_vmm_of), and its config read from /proc or its file."""

    def __init__(self, jail_root: Callable[[str], Path | None] | None = None) -> None:
        self._jail_root = jail_root

    def alive(self, record: VmRecord) -> bool:
        assert record.pid is not None and record.pid_start_time is not None
        return process.is_vmm_of(VmmProcess(record.pid, record.pid_start_time), Path(record.directory),
                                 self._jail(record))

    def view(self, record: VmRecord) -> VmmView:
        assert record.pid is not None and record.pid_start_time is not None
        return read_vmm_view(VmmProcess(record.pid, record.pid_start_time), Path(record.directory),
                             self._jail(record))

    def _jail(self, record: VmRecord) -> Path | None:
        return None if self._jail_root is None else self._jail_root(record.vm_id)


@dataclass
class Sources:
    """Where the doctor reads from; blocking callables, run in threads with deadlines."""

    plan: NetworkPlan
    netns: NetworkNamespace
    vmm_choice: str  # settings.vmm: auto, firecracker or qemu
    kernel: Path | None  # settings.kernel: None means browservm's own
    rootfs: Path | None
    status: Callable[[], list[Check]] | None  # HostNetwork.status; None without a state directory
    record: Callable[[str], Awaitable[VmRecord | None]] | None  # the store's record of a VM
    records: Callable[[], Awaitable[list[VmRecord]]] | None
    vmms: VmmInspector
    qemu: str = QEMU
    firecracker: str = firecracker.FIRECRACKER
    # HostNetwork.expected: what this state directory set; None: only what the plan alone says.
    expected: Callable[[], Expectation] | None = None
    accel: AccelMode = "auto"  # settings.accel
