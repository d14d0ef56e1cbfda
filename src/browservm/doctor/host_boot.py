"""What a VM would boot with, on the host:

    host.vmm     the VMM the settings choose (Firecracker and /dev/kvm, or QEMU and its accelerator)
    host.kernel  `kernel inspect` of --kernel: CONFIG_IP_PNP, virtio built in, fit to boot
    host.image   the image carries the network configurator (debugfs, read-only)
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from browservm.doctor.deadlines import Deadlines, DoctorTimeout, bounded
from browservm.doctor.images import ImageFacts, KernelFacts, inspect_image, inspect_kernel_file
from browservm.doctor.report import HOST_IMAGE, HOST_KERNEL, HOST_VMM, Finding, HopResult
from browservm.doctor.sources import Sources
from browservm.errors import BrowserVMError
from browservm.vmm import firecracker
from browservm.vmm.accel import AccelProbe
from browservm.vmm.placement import choose_placement

F = TypeVar("F", KernelFacts, ImageFacts)


class BootChecks:
    def __init__(self, sources: Sources, deadlines: Deadlines) -> None:
        self._s = sources
        self._d = deadlines

    async def vmm(self) -> HopResult:
        """host.vmm: the VMM the settings choose can run, and where its processes would be placed."""
        result = HopResult(HOST_VMM)
        started = time.monotonic()
        choice = self._s.vmm_choice
        usable, reason = firecracker.available(self._s.firecracker)
        if choice == "firecracker" or (choice == "auto" and usable):
            result.checked.append(f"--vmm {choice}: {self._s.firecracker} and /dev/kvm")
            if not usable:
                code = "vmm.missing" if shutil.which(self._s.firecracker) is None else "vmm.unusable"
                result.found(Finding(code, f"Firecracker cannot run here: {reason}", [reason]))
            else:
                result.checked.append(await self._version(self._s.firecracker))
        else:
            result.checked.append(f"--vmm {choice}: {self._s.qemu}" + (f" (Firecracker: {reason})"
                                                                       if choice == "auto" else ""))
            if shutil.which(self._s.qemu) is None:
                result.found(Finding("vmm.missing", f"no {self._s.qemu} on PATH: no VM can start",
                                     [f"PATH={os.environ.get('PATH', '')}"]))
            else:
                result.checked.append(await self._version(self._s.qemu))
                probe = AccelProbe(self._s.qemu, self._s.accel)
                summary = await bounded(probe.summary, self._d.version, "the accelerator's cached choice")
                result.checked.append(f"accelerator: {summary}")
        # Not a fault on the path to a desktop, but what an operator must know about a hostile guest.
        placement = await bounded(choose_placement, self._d.version, "where VMMs run (cgroups)")
        result.checked.append(f"VMM placement: {placement.reason}")
        result.seconds = time.monotonic() - started
        return result

    async def _version(self, binary: str) -> str:
        def run() -> str:
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=self._d.version,
                                  check=False)
            return (done.stdout.strip().splitlines() or [f"exit {done.returncode}"])[0]
        try:
            return f"version: {await bounded(run, self._d.version + 0.5, f'{binary} --version')}"
        except (BrowserVMError, OSError, subprocess.TimeoutExpired) as exc:
            return f"version: unknown ({exc})"

    async def images(self) -> list[HopResult]:
        """host.kernel, host.image: what the settings name, fit to boot a VM that can be reached."""
        kernel_result, image_result = HopResult(HOST_KERNEL), HopResult(HOST_IMAGE)
        started = time.monotonic()
        kernel, image = await asyncio.gather(self.kernel_facts(self._s.kernel), self.image_facts(self._s.rootfs))
        if kernel is None:
            kernel_result.checked.append("no --kernel: browservm's own kernel (CONFIG_IP_PNP=y) is built or taken "
                                         "from the cache at the first create")
        else:
            self._judge_kernel(kernel, kernel_result)
        if image is None:
            image_result.checked.append("no --rootfs: browservm's own image (with browservm-net) is built or taken "
                                        "from the cache at the first create")
        else:
            self._judge_image(image, image_result)
            if image.has_configurator is False and kernel is not None and kernel.ip_pnp == "n":
                image_result.found(Finding(
                    "guest.no_network_config", "the kernel ignores ip= (no CONFIG_IP_PNP) and the image has no "
                    "network configurator: every VM would come up unreachable",
                    [f"{kernel.path}: CONFIG_IP_PNP is not set", image.detail]))
        kernel_result.seconds = image_result.seconds = time.monotonic() - started
        return [kernel_result, image_result]

    async def kernel_facts(self, path: Path | None) -> KernelFacts | None:
        """What `kernel inspect` says of `path`, within its deadline (the VM walk asks too)."""
        return await self._facts(path, inspect_kernel_file, KernelFacts, "kernel inspect")

    async def image_facts(self, path: Path | None) -> ImageFacts | None:
        """Whether the image at `path` carries the network configurator (debugfs), within its deadline."""
        return await self._facts(path, inspect_image, ImageFacts, "debugfs")

    async def _facts(self, path: Path | None, inspect: Callable[[Path], F], unknown: Callable[[str, None, str], F],
                     what: str) -> F | None:
        if path is None:
            return None
        try:
            return await bounded(lambda: inspect(path), self._d.images, what)
        except DoctorTimeout as exc:
            return unknown(str(path), None, str(exc))

    @staticmethod
    def _judge_kernel(kernel: KernelFacts, result: HopResult) -> None:
        result.checked.append(f"kernel inspect {kernel.path}: CONFIG_IP_PNP, virtio built in, fit to boot")
        if kernel.report is None:
            code = "kernel.missing" if kernel.error == "no such file" else "kernel.unreadable"
            result.found(Finding(code, f"{kernel.path}: {kernel.error}"))
            return
        report = kernel.report
        result.checked.append(f"{report.banner}: {report.verdict}")
        if not report.ready:
            result.found(Finding("kernel.unfit", report.verdict,
                                 [f.message for f in report.findings if f.severity == "blocker"]))
        if report.value("IP_PNP") == "n":
            result.found(Finding("kernel.no_ip_pnp", "this kernel ignores ip= (no CONFIG_IP_PNP): only the image's "
                                 "configurator can configure eth0", [f"{kernel.path}: CONFIG_IP_PNP is not set"],
                                 fatal=False))

    @staticmethod
    def _judge_image(image: ImageFacts, result: HopResult) -> None:
        result.checked.append(f"{image.path} carries {'/usr/lib/browservm/bin/browservm-net'} (debugfs, read-only)")
        if image.detail == "no such file":
            result.found(Finding("image.missing", f"{image.path}: no such file"))
        elif image.has_configurator is None:
            result.found(Finding("image.unreadable", image.detail, fatal=False))
        elif not image.has_configurator:
            result.found(Finding("guest.no_configurator", "the image has no network configurator (browservm-net): "
                                 "only a kernel with CONFIG_IP_PNP can configure eth0", [image.detail], fatal=False))
        else:
            result.checked.append(image.detail)

    # --- one VM ----------------------------------------------------------------------------
