"""Firecracker never runs a guest as root (issue 18 #3): it cannot drop root itself, so as root it
runs only through its jailer, as the VM's own uid. Firecracker needs KVM, which these hosts lack:
the binaries are stand-ins, and what is checked is what the controller asks of them (the argv,
the uid the jailer is told, the environment) and what it refuses to start at all."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from browservm.errors import VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.vmdir import VM_CONFIG
from browservm.vmm import firecracker, process
from browservm.vmm.driver import FirecrackerDriver, QemuDriver, choose_driver
from browservm.vmm.firecracker import AS_ROOT, JailerOptions
from browservm.vmm.placement import NoCgroup
from browservm.vmm.process import VMM_ENVIRONMENT, VmmProcess
from browservm.vmm.spec import VmSpec

from .test_firecracker_spec import spec_for

VM_UID = 0x70000007
PLACEMENT = NoCgroup("a unit test: placement does not matter")

# What the real jailer does with --uid and --gid before it execs Firecracker: drop to them for good.
# It also says what it was asked, for the test to read.
JAILER = f"""#!{sys.executable}
import os, sys, time
open(os.path.join(os.path.dirname(sys.argv[0]), "asked"), "w").write("\\0".join(sys.argv[1:]))
uid, gid = int(sys.argv[sys.argv.index("--uid") + 1]), int(sys.argv[sys.argv.index("--gid") + 1])
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
time.sleep(60)
"""
FIRECRACKER = f"""#!{sys.executable}
import os, sys
open(os.path.join(os.path.dirname(sys.argv[0]), "ran"), "w").write("firecracker ran")
"""


@pytest.fixture
def binaries(tmp_path: Path) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir()
    for name, text in (("jailer", JAILER), ("firecracker", FIRECRACKER)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


@pytest.fixture
def spawned() -> Iterator[list[VmmProcess]]:
    started: list[VmmProcess] = []
    try:
        yield started
    finally:
        for vmm in started:
            process.signal_process(vmm, signal.SIGKILL)
            assert process.wait_exit(vmm, 10)


def vm(tmp_path: Path, run_as: int | None = VM_UID) -> VmSpec:
    directory = tmp_path / "vms" / "vm-abc"
    directory.mkdir(parents=True)
    spec = dataclasses.replace(spec_for("vm-abc", directory), kernel=tmp_path / "vmlinux",
                               rootfs=tmp_path / "rootfs.ext4", run_as=run_as)
    for path in (spec.kernel, spec.rootfs, spec.overlay, spec.config_disk):
        assert path is not None
        path.write_bytes(b"x")
    return spec


def test_as_root_auto_takes_qemu_and_firecracker_without_its_jailer_is_refused(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(firecracker, "available", lambda firecracker="": (True, "a stand-in says it can run"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert isinstance(choose_driver("auto", placement=PLACEMENT), QemuDriver)
    with pytest.raises(VmmError) as excinfo:
        choose_driver("firecracker", placement=PLACEMENT)
    assert excinfo.value.reason == f"firecracker cannot run here: {AS_ROOT}"
    options = JailerOptions(uid=0, gid=0, chroot_base=tmp_path / "jail")
    assert isinstance(choose_driver("auto", jailer=options, placement=PLACEMENT), FirecrackerDriver)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # unprivileged, it runs as that user: allowed
    assert isinstance(choose_driver("auto", placement=PLACEMENT), FirecrackerDriver)


def test_an_unjailed_firecracker_is_never_started_by_root(tmp_path: Path, binaries: Path) -> None:
    driver = FirecrackerDriver(binary=str(binaries / "firecracker"), placement=PLACEMENT, euid=0)
    spec = vm(tmp_path)
    with pytest.raises(VmmError) as started:
        driver.start(spec, NetworkNamespace(None))
    with pytest.raises(VmmError) as restored:
        driver.restore(spec, NetworkNamespace(None), tmp_path / "state", lambda: None)
    assert started.value.reason == restored.value.reason == AS_ROOT
    assert not (binaries / "ran").exists() and not (spec.directory / VM_CONFIG).exists()


def test_a_jailer_told_to_run_firecracker_as_root_is_never_started(tmp_path: Path, binaries: Path) -> None:
    options = JailerOptions(uid=0, gid=0, chroot_base=tmp_path / "jail")  # --vmm-user root, no VM uids
    driver = FirecrackerDriver(binary=str(binaries / "firecracker"), jailer=options,
                               jailer_binary=str(binaries / "jailer"), placement=PLACEMENT, euid=0)
    with pytest.raises(VmmError, match="the jailer would run Firecracker as root"):
        driver.start(vm(tmp_path, run_as=None), NetworkNamespace(None))
    assert not (binaries / "asked").exists() and not (tmp_path / "jail").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can start the jailer")
def test_as_root_the_jailer_runs_firecracker_as_the_vms_own_uid_with_nothing_of_ours(
        tmp_path: Path, binaries: Path, spawned: list[VmmProcess], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", "api-key-of-the-controller")
    options = JailerOptions(uid=0, gid=0, chroot_base=tmp_path / "jail")
    driver = FirecrackerDriver(binary=str(binaries / "firecracker"), jailer=options,
                               jailer_binary=str(binaries / "jailer"), placement=PLACEMENT)
    spec = vm(tmp_path)
    vmm = driver.start(spec, NetworkNamespace(None))
    spawned.append(vmm)
    deadline = time.monotonic() + 10
    while _uids(vmm.pid) != {VM_UID}:
        assert time.monotonic() < deadline, f"the jailer stand-in never dropped to {VM_UID}: {_uids(vmm.pid)}"
        time.sleep(0.02)
    asked = (binaries / "asked").read_text().split("\0")
    assert asked[:8] == ["--id", "vm-abc", "--exec-file", str(binaries / "firecracker"), "--uid", str(VM_UID),
                         "--gid", str(VM_UID)]
    assert asked[asked.index("--") + 1:] == ["--api-sock", "/run/firecracker.sock", "--config-file", "/vm-config.json"]
    environ = Path(f"/proc/{vmm.pid}/environ").read_bytes().split(b"\0")
    assert {entry.decode() for entry in environ if entry} == {f"{k}={v}" for k, v in VMM_ENVIRONMENT.items()}
    # Its writable disks are the VM uid's, in its jail; the shared images stay the host's.
    root = firecracker.jail_root(spec.vm_id, options, str(binaries / "firecracker"))
    assert {(root / name).stat().st_uid for name in ("overlay.ext4", "config.img", "run")} == {VM_UID}
    assert (root / "rootfs.ext4").stat().st_uid == 0
    process.signal_process(vmm, signal.SIGKILL)
    assert process.wait_exit(vmm, 10)
    driver.release(spec.vm_id)
    assert not root.parent.exists()


def _uids(pid: int) -> set[int]:
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {int(uid) for uid in status["Uid"].split()}
