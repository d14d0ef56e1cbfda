"""A VM's record and images as the VmSpec its VMM is started with."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from browservm.guest.bootargs import BootArgs, IpConfig, build_boot_args
from browservm.vm.image_source import Images
from browservm.vm.records import VmRecord
from browservm.vmdir import VmDirectory
from browservm.vmm.driver import VmmDriver
from browservm.vmm.spec import VmSpec


def vm_uid(base: int, address: str) -> int:
    """The uid (and gid) a VM's VMM runs as: one per VM, from its address's low 24 bits.

    VM addresses are unique and all in one private subnet (at most 10.0.0.0/8, 24 bits of host),
    so no two live VMs share a uid, and a uid means the same VM for as long as it lives.
    """
    return base + (int(IPv4Interface(address).ip) & 0xFFFFFF)


class VmSpecs:
    def __init__(self, driver: VmmDriver, vm_uid_base: int | None) -> None:
        self._driver = driver
        self._vm_uid_base = vm_uid_base  # None: VMMs run as the controller's user

    def of(self, record: VmRecord, images: Images, extra_boot_args: tuple[str, ...] = ()) -> VmSpec:
        ip = IpConfig.static(IPv4Interface(record.address), IPv4Address(record.gateway), hostname=record.vm_id)
        boot_args = build_boot_args(BootArgs(
            ip=ip, read_only=True, init="/usr/lib/browservm/overlay-init", reboot=self._driver.reboot,
            extra=extra_boot_args))
        files = VmDirectory(Path(record.directory))
        return VmSpec(vm_id=record.vm_id, vcpus=record.vcpus, mem_mib=record.mem_mib, kernel=images.kernel,
                      rootfs=images.rootfs, overlay=files.overlay, boot_args=boot_args, tap=record.tap,
                      mac=record.mac, directory=files.path, config_disk=files.config_disk,
                      run_as=None if self._vm_uid_base is None else vm_uid(self._vm_uid_base, record.address))
