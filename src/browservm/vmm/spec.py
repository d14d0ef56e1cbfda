"""What a VMM needs to start one VM, as a plain value built by the manager."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from browservm.vmdir import VmDirectory


@dataclass(frozen=True)
class VmSpec:
    vm_id: str
    vcpus: int
    mem_mib: int
    kernel: Path
    rootfs: Path  # the shared golden image, attached read-only
    overlay: Path | None  # the VM's own writable disk
    boot_args: str
    tap: str
    mac: str
    directory: Path  # per-VM: console log, VMM log, sockets, generated config
    config_disk: Path | None = None  # secrets and settings (guest/configdisk.py): the third disk, read-only
    run_as: int | None = None  # the VM's own uid (and gid) the VMM drops to; None: the controller's user

    @classmethod
    def placeholder(cls, vm_id: str, directory: Path, *, vcpus: int = 1, mem_mib: int = 0, kernel: Path = Path(),
                    rootfs: Path = Path()) -> VmSpec:
        """A spec with only what stopping or watching a VM needs (its id and directory: its control
        socket), or keying a snapshot (its size and kernel: the drivers blank every per-VM value)."""
        return cls(vm_id, vcpus, mem_mib, kernel, rootfs, None, "", "", "", directory)

    @property
    def files(self) -> VmDirectory:
        return VmDirectory(self.directory)

    @property
    def console_log(self) -> Path:
        return self.files.console_log

    @property
    def vmm_log(self) -> Path:
        return self.files.vmm_log

    @property
    def control_socket(self) -> Path:
        return self.files.control_socket
