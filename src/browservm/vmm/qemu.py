"""The QEMU `microvm` driver: Firecracker's device model (virtio-mmio net and block, a serial
console), from Debian's qemu-system-x86, on KVM where KVM really runs the guest and with
software emulation (TCG) where it does not.

Whether KVM runs a guest is found out by trying, not assumed from /dev/kvm being there: a
nested PVM device (as on our CI machines) accepts KVM_CREATE_VM and then hangs a normal guest
kernel. `AccelProbe` boots the kernel under KVM once, without a root disk, and takes KVM only
if the kernel got as far as printing its banner; the answer is cached per kernel and host boot.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
from dataclasses import dataclass
from pathlib import Path

from browservm.errors import VmmError
from browservm.progress import cache_dir
from browservm.vmm.placement import ResourceLimits
from browservm.vmm.spec import VmSpec

QEMU = "qemu-system-x86_64"
_PROBE_TIMEOUT_S = 8.0


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str


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


class AccelProbe:
    def __init__(self, qemu: str = QEMU, cache: Path | None = None, timeout: float = _PROBE_TIMEOUT_S) -> None:
        self._qemu = qemu
        self._cache = (cache or cache_dir("accel")) / "accel.json"
        self._timeout = timeout

    def choose(self, kernel: Path) -> Accel:
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return Accel("tcg", "/dev/kvm is missing or not accessible")
        key = self._key(kernel)
        cached = self._read_cache().get(key)
        if cached is not None:
            return Accel(cached["name"], cached["reason"])
        accel = self._probe(kernel)
        entries = self._read_cache()
        entries[key] = {"name": accel.name, "reason": accel.reason}
        self._cache.parent.mkdir(parents=True, exist_ok=True)
        partial = self._cache.with_suffix(".partial")
        partial.write_text(json.dumps(entries, indent=2))
        os.replace(partial, self._cache)
        return accel

    def _key(self, kernel: Path) -> str:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        digest = hashlib.sha256(kernel.read_bytes()).hexdigest()[:16]
        return f"{boot_id}/{digest}"

    def _read_cache(self) -> dict[str, dict[str, str]]:
        try:
            entries: dict[str, dict[str, str]] = json.loads(self._cache.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return entries

    def _probe(self, kernel: Path) -> Accel:
        # No root disk: a kernel that runs panics at once, and panic=-1 with -no-reboot ends QEMU.
        argv = [self._qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-m", "128M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 reboot=t"]
        try:
            probe = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        except OSError as exc:
            raise VmmError("-", "probe KVM", f"cannot run {self._qemu}: {exc.strerror}") from exc
        try:
            output, _ = probe.communicate(timeout=self._timeout)
        except subprocess.TimeoutExpired:
            probe.kill()
            output, _ = probe.communicate()
        if b"Linux version" in output:
            return Accel("kvm", "KVM booted this kernel")
        return Accel("tcg", f"KVM did not boot this kernel within {self._timeout:g} s "
                            "(/dev/kvm may only run specially built guests, e.g. a nested PVM device)")
