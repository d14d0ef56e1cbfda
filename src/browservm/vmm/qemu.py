"""The QEMU `microvm` driver: Firecracker's device model (virtio-mmio net and block, a serial
console), from Debian's qemu-system-x86, on KVM where KVM really runs the guest and with
software emulation (TCG) where it does not (accel.py chooses).
"""

from __future__ import annotations

import re
import resource

from browservm.errors import VmmError
from browservm.vmm.placement import ResourceLimits
from browservm.vmm.spec import VmSpec

QEMU = "qemu-system-x86_64"
# What follows a KVM error on QEMU's stderr: the vCPU's registers and the error's raw data, dozens of
# lines that would push QEMU's own words ("KVM internal error. Suberror: 1", "emulation failure") out
# of any tail kept as evidence.
_DUMP = re.compile(r"^\s*(extra data\[\d+\]|Code=|[A-Z][A-Z0-9]{1,4}\s*=)")


def without_dumps(lines: list[str]) -> list[str]:
    """QEMU's log lines without its register and data dumps."""
    return [line for line in lines if line.strip() and not _DUMP.match(line)]


# seccomp: no obsolete system calls, no fork/exec, no CPU affinity or priority changes. Not
# `elevateprivileges=deny`: it would also forbid the setuid of -runas, which happens after the
# filter is in place (QEMU dies with SIGSYS).
SANDBOX = "on,obsolete=deny,spawn=deny,resourcecontrol=deny"
# Threads of the VM's own uid (vCPUs, I/O workers, up to 64 by default, and a few more): a VMM
# that goes beyond is broken or taken over. No core dumps: they would hold the guest's memory.
MAX_THREADS = 256


# QEMU's own memory beside the guest's: under TCG its translation cache alone takes hundreds of
# MiB (a 1 GiB desktop VM was measured at 1.66 GiB resident). A ceiling, not a budget.
OVERHEAD_MIB = 1024


def qemu_limits(spec: VmSpec) -> ResourceLimits:
    """The VM's cgroup limits: its vCPUs' worth of CPU, its memory plus QEMU's, its threads."""
    return ResourceLimits(cpus=spec.vcpus, memory_mib=spec.mem_mib + OVERHEAD_MIB, tasks=MAX_THREADS + spec.vcpus)


def qemu_rlimits(spec: VmSpec) -> list[tuple[int, int]]:
    """Resource limits for the VMM process; the thread count only binds once it is the VM's uid."""
    limits = [(resource.RLIMIT_CORE, 0)]
    if spec.run_as is not None:
        limits.append((resource.RLIMIT_NPROC, MAX_THREADS + spec.vcpus))
    return limits


def qemu_argv(spec: VmSpec, accel: str, qemu: str = QEMU, overlay_fd: int | None = None) -> list[str]:
    """The whole QEMU command line for `spec` (a value: tested without running anything).

    QEMU opens every file and device it needs (disks, TAP, console, control socket, /dev/kvm) at
    start, as root, then drops to the VM's own uid (`-runas`) under a seccomp filter (`-sandbox`):
    a guest that escapes into QEMU holds neither root nor another VM's files.

    With `overlay_fd` (an open descriptor QEMU inherits) the VM's disk is named through it: QEMU
    reopens the disk when a snapshot is saved or restored, as its own uid, which may read the
    disk (it owns it) but not walk the state directory (root's, 0700) to it.
    """
    paths = [spec.kernel, spec.rootfs, spec.console_log, spec.control_socket, spec.overlay, spec.config_disk]
    for path in paths:
        if path is not None and "," in str(path):
            raise VmmError(spec.vm_id, "configure", f"QEMU cannot take a path with a comma: {path}")
    argv = [
        qemu, "-name", f"browservm-{spec.vm_id}",
        "-M", "microvm,acpi=off", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max",
        "-smp", str(spec.vcpus), "-m", f"{spec.mem_mib}M",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel), "-append", spec.boot_args,
        "-chardev", f"file,id=console,path={spec.console_log}", "-serial", "chardev:console",
        # Order matters: the first disk is the guest's /dev/vda (the root), the second /dev/vdb.
        "-drive", f"id=root,file={spec.rootfs},format=raw,if=none,readonly=on",
        "-device", "virtio-blk-device,drive=root",
    ]
    if spec.overlay is not None:
        overlay = spec.overlay if overlay_fd is None else f"/proc/self/fd/{overlay_fd}"
        argv += ["-drive", f"id=overlay,file={overlay},format=raw,if=none",
                 "-device", "virtio-blk-device,drive=overlay"]
    if spec.overlay is not None and spec.config_disk is not None:  # /dev/vdc: after the overlay, or it'd be vdb
        argv += ["-drive", f"id=config,file={spec.config_disk},format=raw,if=none,readonly=on",
                 "-device", "virtio-blk-device,drive=config"]
    argv += [
        "-netdev", f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        "-device", f"virtio-net-device,netdev=net0,mac={spec.mac}",
        "-qmp", f"unix:{spec.control_socket},server=on,wait=off",
        "-sandbox", SANDBOX,
    ]
    if spec.run_as is not None:
        argv += ["-runas", f"{spec.run_as}:{spec.run_as}"]
    return argv
