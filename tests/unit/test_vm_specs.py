"""A VM's record as the spec its VMM starts with: its files by vmdir's names, the driver's reboot=."""

from __future__ import annotations

from pathlib import Path

import pytest

from browservm.vm.image_source import Images
from browservm.vm.records import VmRecord
from browservm.vm.specs import VmSpecs, vm_uid
from browservm.vmdir import VmDirectory
from browservm.vmm.driver import FirecrackerDriver, QemuDriver, VmmDriver
from browservm.vmm.placement import NoCgroup


def _record(tmp_path: Path) -> VmRecord:
    return VmRecord(vm_id="vm-abc", user="ann", vcpus=2, mem_mib=1024, directory=str(tmp_path / "vm-abc"),
                    address="192.168.100.7/24", gateway="192.168.100.1", tap="fc-abc", mac="02:fc:00:00:00:07")


@pytest.mark.parametrize(("driver", "reboot"), [
    (QemuDriver(placement=NoCgroup("a test's")), "reboot=t"),  # QEMU runs with -no-reboot: a triple fault ends it
    (FirecrackerDriver(placement=NoCgroup("a test's"), euid=1000), "reboot=k"),  # the i8042 reset it handles
])
def test_the_kernel_line_reboots_the_way_the_vms_vmm_notices(tmp_path: Path, driver: VmmDriver, reboot: str) -> None:
    images = Images(tmp_path / "vmlinux", tmp_path / "rootfs.ext4", tmp_path / "template.ext4")
    spec = VmSpecs(driver, vm_uid_base=None).of(_record(tmp_path), images)
    assert reboot in spec.boot_args.split()
    assert spec.run_as is None


def test_a_spec_names_the_vms_own_files_and_uid(tmp_path: Path) -> None:
    images = Images(tmp_path / "vmlinux", tmp_path / "rootfs.ext4", tmp_path / "template.ext4")
    spec = VmSpecs(QemuDriver(placement=NoCgroup("a test's")), vm_uid_base=0x70000000).of(
        _record(tmp_path), images, ("loglevel=4",))
    files = VmDirectory(tmp_path / "vm-abc")
    assert (spec.overlay, spec.config_disk, spec.console_log, spec.vmm_log, spec.control_socket) == (
        files.overlay, files.config_disk, files.console_log, files.vmm_log, files.control_socket)
    assert spec.run_as == vm_uid(0x70000000, "192.168.100.7/24") == 0x70000000 + (168 << 16) + (100 << 8) + 7
    assert "loglevel=4" in spec.boot_args.split() and "ip=192.168.100.7::192.168.100.1:255.255.255.0:vm-abc:eth0:off" \
        in spec.boot_args.split()
