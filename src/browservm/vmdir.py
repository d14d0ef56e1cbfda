"""One VM's directory, and every file in it, by name: the one place these names are spelled.

    <state dir>/vms/<vm id>/console.log     the guest's serial console (capped: vm/console.py)
                           /vmm.log         the VMM's own log (its stderr, or Firecracker's logger)
                           /overlay.ext4    the VM's own writable disk (a sparse clone)
                           /config.img      its config disk: secrets and identity (guest/configdisk.py)
                           /control.sock    the VMM's control socket (QMP, or Firecracker's API)
                           /vm-config.json  Firecracker's configuration (also what the doctor reads)

A jailed Firecracker's chroot holds the same names at its root. Standard library only, so the
manager, the drivers and the doctor all use it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CONSOLE_LOG = "console.log"
VMM_LOG = "vmm.log"
OVERLAY = "overlay.ext4"
CONFIG_DISK = "config.img"
CONTROL_SOCKET = "control.sock"
VM_CONFIG = "vm-config.json"


@dataclass(frozen=True)
class VmDirectory:
    path: Path

    @classmethod
    def under(cls, vm_root: Path, vm_id: str) -> VmDirectory:
        return cls(vm_root / vm_id)

    @property
    def vm_id(self) -> str:
        return self.path.name

    @property
    def console_log(self) -> Path:
        return self.path / CONSOLE_LOG

    @property
    def vmm_log(self) -> Path:
        return self.path / VMM_LOG

    @property
    def overlay(self) -> Path:
        return self.path / OVERLAY

    @property
    def config_disk(self) -> Path:
        return self.path / CONFIG_DISK

    @property
    def control_socket(self) -> Path:
        return self.path / CONTROL_SOCKET

    @property
    def vm_config(self) -> Path:
        return self.path / VM_CONFIG


def vm_directories(vm_root: Path) -> list[VmDirectory]:
    """Every VM directory under `vm_root`, by name (none when it does not exist yet). Blocking."""
    if not vm_root.is_dir():
        return []
    return [VmDirectory(path) for path in sorted(vm_root.iterdir()) if path.is_dir()]
