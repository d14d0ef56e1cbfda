"""The QEMU command line and limits as values: what the VMM is allowed once the guest runs."""

from __future__ import annotations

import dataclasses
import resource
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from browservm.errors import VmmError
from browservm.guest.bootargs import BootArgs, IpConfig, build_boot_args
from browservm.ids import names_for
from browservm.vm.specs import vm_uid
from browservm.vmm.qemu import MAX_THREADS, SANDBOX, qemu_argv, qemu_rlimits
from browservm.vmm.spec import VmSpec


def spec_for(tmp_path: Path, run_as: int | None = None) -> VmSpec:
    names = names_for("vm-abc")
    ip = IpConfig.static(IPv4Interface("192.168.100.7/24"), IPv4Address("192.168.100.1"), hostname="vm-abc")
    return VmSpec(vm_id="vm-abc", vcpus=2, mem_mib=1024, kernel=tmp_path / "vmlinux", rootfs=tmp_path / "rootfs.ext4",
                  overlay=tmp_path / "overlay.ext4", boot_args=build_boot_args(BootArgs(ip=ip)), tap=names.tap,
                  mac=names.mac, directory=tmp_path, config_disk=tmp_path / "config.img", run_as=run_as)


def test_qemu_drops_to_the_vms_uid_under_seccomp(tmp_path: Path) -> None:
    argv = qemu_argv(spec_for(tmp_path, run_as=1879048199), "tcg")
    assert argv[argv.index("-runas") + 1] == "1879048199:1879048199"
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    # It must not forbid the setuid -runas makes after the filter is in place.
    assert "elevateprivileges=deny" not in SANDBOX and "spawn=deny" in SANDBOX


def test_without_a_uid_of_its_own_qemu_keeps_the_sandbox_and_runs_as_the_controller(tmp_path: Path) -> None:
    argv = qemu_argv(spec_for(tmp_path), "tcg")
    assert "-runas" not in argv and "-sandbox" in argv
    assert dict(qemu_rlimits(spec_for(tmp_path))) == {resource.RLIMIT_CORE: 0}


def test_the_vms_uid_bounds_its_threads_and_forbids_core_dumps(tmp_path: Path) -> None:
    limits = dict(qemu_rlimits(spec_for(tmp_path, run_as=1879048199)))
    assert limits == {resource.RLIMIT_CORE: 0, resource.RLIMIT_NPROC: MAX_THREADS + 2}


def test_each_address_has_its_own_uid_and_no_vm_is_root() -> None:
    base = 0x70000000
    uids = {vm_uid(base, f"10.{a}.{b}.{c}/8") for a in (0, 255) for b in (0, 7) for c in (1, 254)}
    assert len(uids) == 8 and min(uids) > base
    assert vm_uid(base, "192.168.100.7/24") == base + (168 << 16) + (100 << 8) + 7


def test_a_path_with_a_comma_is_refused_before_qemu_parses_it(tmp_path: Path) -> None:
    spec = dataclasses.replace(spec_for(tmp_path), rootfs=tmp_path / "a,b.ext4")
    with pytest.raises(VmmError, match="comma"):
        qemu_argv(spec, "tcg")
