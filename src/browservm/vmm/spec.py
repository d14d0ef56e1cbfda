"""What a VMM needs to start one VM, as a plain value built by the manager."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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

    @property
    def console_log(self) -> Path:
        return self.directory / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.directory / "vmm.log"

    @property
    def control_socket(self) -> Path:
        return self.directory / "control.sock"
