"""VM benchmarks: boot timeline, readiness detection, per-VM disks, controller overhead.

Run as root: python3 bench/vm_bench.py [--boots 1] [--sequential 20] [--concurrent 5]

Everything runs in a network namespace this script creates and deletes, with
the minimal image and our kernel (built and cached on first use), under QEMU
(TCG where KVM does not run guests).

  boot timeline     VMM start -> each console marker, and create-to-ready by stage (issues 3, 4)
  detection         readiness detected after websockify reported listening (target <= 100 ms)
  per-VM disk       time and bytes of a VM's writable disk, with a 2 GiB golden image, against a
                    full copy of that image measured in the same run (target < 50 ms, < 10 MiB)
  overhead          the controller's own work per VM, everything but waiting for the guest:
                    lease, TAP, disk, VMM start, VMM stop, TAP delete, release; 20 sequential and
                    5 concurrent (target <= 50 ms)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from browservm.config import load_settings
from browservm.controller import open_controller, resolve_images
from browservm.guest.bootargs import BootArgs, IpConfig, build_boot_args
from browservm.guest.markers import parse_marker
from browservm.images.disk import allocated_bytes, clone_sparse
from browservm.ipam import Ipam
from browservm.progress import Progress
from browservm.vm.console import ConsoleLog
from browservm.vm.image_source import Images
from browservm.vmdir import VmDirectory
from browservm.vmm.driver import QemuDriver
from browservm.vmm.spec import VmSpec

MARKERS = ("disk", "net", "xvfb", "openbox", "x11vnc", "websockify")


def _marker_name(line: str) -> str | None:
    marker = parse_marker(line)
    if marker is None:
        return None
    topic, fields = marker
    return fields.get("service") if topic == "ready" else topic


async def _timeline(console: ConsoleLog, seen: dict[str, float], stop: asyncio.Event) -> None:
    """Host arrival time of each console marker (monotonic clock)."""
    def note(line: str) -> bool:
        name = _marker_name(line)
        if name is not None and name not in seen:
            seen[name] = time.monotonic()
        return stop.is_set()
    while not stop.is_set():
        await console.wait_for(note, 1.0)


def boot_timeline(state: Path, boots: int) -> None:
    settings = load_settings(netns=f"bvbench-{os.getpid()}", state_dir=state, vmm="qemu", image_profile="minimal")
    with open_controller(settings) as controller:
        controller.network.up()
        manager = controller.manager
        try:
            for _ in range(boots):
                async def one() -> None:
                    seen: dict[str, float] = {}
                    stop = asyncio.Event()
                    start = time.monotonic()
                    stamps: dict[str, float] = {}
                    watcher: asyncio.Task[None] | None = None
                    directory = Path()

                    def stage(name: str, seconds: float) -> None:
                        nonlocal watcher
                        stamps[name] = time.monotonic()
                        if name == "disk.clone":
                            console = ConsoleLog(VmDirectory(directory).console_log)
                            watcher = asyncio.ensure_future(_timeline(console, seen, stop))

                    started, creating = await manager.start(on_stage=stage)
                    directory = Path(started.directory)  # before the first stage: the task has not run yet
                    record = await creating
                    stop.set()
                    if watcher is not None:
                        await watcher
                    spawned = stamps["vmm.spawn"]
                    print(f"\n{record.vm_id}: {record.state.value} ({record.accel}), create-to-ready "
                          f"{stamps.get('rfb.banner', time.monotonic()) - start:.2f} s")
                    print("  console markers after VMM start: " + "  ".join(
                        f"{name} {seen[name] - spawned:.2f}s" for name in MARKERS if name in seen))
                    previous = start
                    parts = []
                    for name, at in stamps.items():
                        parts.append(f"{name} {(at - previous) * 1000:.0f}ms")
                        previous = at
                    print("  stages (duration each): " + "  ".join(parts))
                    if "websockify" in seen and "net.tcp" in stamps:
                        print(f"  detection: net.tcp done {(stamps['net.tcp'] - seen['websockify']) * 1000:.1f} ms "
                              f"after the websockify marker reached the host   (target <= 100 ms)")
                    await manager.destroy(record.vm_id)

                asyncio.run(one())
        finally:
            controller.network.down(force=True)


def per_vm_disk(images: Images, work: Path) -> None:
    golden = work / "golden-2g.img"
    with golden.open("wb") as out:  # a 2 GiB golden image with real data in every block
        block = os.urandom(2**20)
        for _ in range(2048):
            out.write(block)
    ours, ours_bytes, copies, copy_bytes = [], [], [], []
    for i in range(20):
        target = work / f"vm-{i}.ext4"
        start = time.perf_counter()
        ours_bytes.append(clone_sparse(images.disk_template, target))
        ours.append((time.perf_counter() - start) * 1000)
        target.unlink()
    for i in range(3):
        target = work / f"copy-{i}.img"
        start = time.perf_counter()
        shutil.copyfile(golden, target)
        os.sync()
        copies.append((time.perf_counter() - start) * 1000)
        copy_bytes.append(allocated_bytes(target))
        target.unlink()
    print(f"\nper-VM disk with a 2 GiB golden image: {statistics.median(ours):.2f} ms, "
          f"{statistics.median(ours_bytes) / 2**20:.1f} MiB   (target < 50 ms, < 10 MiB; the golden image is "
          "shared read-only, so this does not depend on its size)")
    print(f"baseline full copy: {statistics.median(copies):.0f} ms, {statistics.median(copy_bytes) / 2**20:.0f} MiB"
          f"   ratio {statistics.median(copies) / statistics.median(ours):.0f}x time, "
          f"{statistics.median(copy_bytes) / statistics.median(ours_bytes):.0f}x bytes")


def overhead(state: Path, sequential: int, concurrent: int) -> None:
    settings = load_settings(netns=f"bvbench-{os.getpid()}", state_dir=state, vmm="qemu", image_profile="minimal")
    with open_controller(settings) as controller:
        controller.network.up()
        images = resolve_images(settings, Progress())
        driver = QemuDriver()
        ipam = Ipam(controller.store, controller.network.plan)
        network = controller.network
        driver.accel(images.kernel)  # probe once, outside the measurement

        def one(vm_id: str) -> float:
            start = time.perf_counter()
            lease = ipam.lease(vm_id)
            network.add_tap(lease)
            files = VmDirectory.under(state / "vms", vm_id)
            files.path.mkdir(parents=True)
            clone_sparse(images.disk_template, files.overlay)
            args = build_boot_args(BootArgs(ip=IpConfig.static(lease.address, lease.gateway), read_only=True,
                                            init="/usr/lib/browservm/overlay-init", reboot=driver.reboot))
            spec = VmSpec(vm_id, 1, 512, images.kernel, images.rootfs, files.overlay, args,
                          lease.tap, lease.mac, files.path)
            vmm = driver.start(spec, network.netns)
            driver.stop(spec, vmm, 10)
            network.remove_tap(vm_id)
            ipam.release(vm_id)
            shutil.rmtree(files.path)
            return (time.perf_counter() - start) * 1000

        try:
            serial = [one(f"vm-seq-{i}") for i in range(sequential)]

            async def together() -> list[float]:
                return await asyncio.gather(*(asyncio.to_thread(one, f"vm-con-{i}") for i in range(concurrent)))
            began = time.perf_counter()
            parallel = asyncio.run(together())
            wall = (time.perf_counter() - began) * 1000
        finally:
            network.down(force=True)
    print("\ncontroller overhead per VM (lease, TAP, disk, VMM start and stop, TAP delete, release):")
    print(f"  {sequential} sequential: median {statistics.median(serial):.1f} ms, max {max(serial):.1f} ms")
    print(f"  {concurrent} concurrent: median {statistics.median(parallel):.1f} ms, max {max(parallel):.1f} ms each; "
          f"{wall:.0f} ms for all, {wall / concurrent:.1f} ms per VM   (target <= 50 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=1)
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bvbench-") as scratch:
        work = Path(scratch)
        images = resolve_images(load_settings(state_dir=work, image_profile="minimal"), Progress())
        per_vm_disk(images, work)
        overhead(work / "overhead", args.sequential, args.concurrent)
        if args.boots:
            boot_timeline(work / "boots", args.boots)


if __name__ == "__main__":
    main()
