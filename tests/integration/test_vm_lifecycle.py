"""The VM lifecycle with real guests under QEMU, each test in namespaces of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from browservm.ipam import Ipam
from browservm.vm.readiness import desktop_banner
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmm.firecracker import available
from browservm.vmm.process import VMM_ENVIRONMENT
from browservm.vmm.qemu import MAX_THREADS

from .conftest import Controllers, run, vmm_pids_under

pytestmark = [pytest.mark.host, pytest.mark.vm]
FIRECRACKER_RUNS, FIRECRACKER_WHY_NOT = available()


def leftovers(controllers: Controllers) -> dict[str, list[Any]]:
    """Everything a VM could leave behind, as seen by the kernel and the file system."""
    vms = controllers.state_dir / "vms"
    return {
        "taps": run("ip", "-o", "link", "show", "type", "tun", netns=controllers.netns).stdout.splitlines(),
        "vmm processes": vmm_pids_under(controllers.state_dir),
        "vm directories": sorted(p.name for p in vms.iterdir()) if vms.exists() else [],
    }


def vmm_confinement(pid: int) -> tuple[str, str, str]:
    """A running VMM's effective capabilities, no_new_privs flag and process (thread) limit."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    processes = next(line.split()[2] for line in limits if line.startswith("Max processes"))
    return status["CapEff"].strip(), status["NoNewPrivs"].strip(), processes


def vmm_environment(pid: int) -> dict[str, str]:
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(entry.decode().split("=", 1) for entry in environ.split(b"\0") if entry)


def vmm_credentials(pid: int) -> tuple[int, str, str]:
    """A running VMM's real uid, seccomp mode and core-file limit."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    core = next(line.split()[4] for line in limits if line.startswith("Max core file size"))
    return int(status["Uid"].split()[0]), status["Seccomp"].strip(), core


def test_three_vms_created_at_once_all_pass_every_hop_and_leave_nothing_behind(
        controllers: Controllers, monkeypatch: pytest.MonkeyPatch) -> None:
    # As under systemd, where the controller's environment carries its keys (/etc/default/browservm).
    monkeypatch.setenv("BROWSERVM_API_KEY", "api-key-of-the-controller")
    monkeypatch.setenv("BROWSERVM_VAULT_KEY", "vault-key-of-the-controller")
    controller = controllers.open()
    manager = controller.manager
    nft_before = run("nft", "-j", "list", "table", "inet", "browservm", netns=controllers.netns).stdout

    async def three() -> list[VmRecord]:
        return await asyncio.gather(*(manager.create(user=f"user{i}") for i in range(3)))

    records = asyncio.run(three())
    assert [r.state for r in records] == [VmState.READY] * 3, [r.failure for r in records]
    assert len({r.address for r in records}) == len({r.tap for r in records}) == len({r.mac for r in records}) == 3
    for record in records:
        assert list(record.stages)[-1] == "desktop.complete"
        assert record.pid is not None and Path(f"/proc/{record.pid}").exists()
    # Each VMM dropped root for a uid of its own, under a seccomp filter, with no core dumps.
    credentials = [vmm_credentials(r.pid) for r in records if r.pid is not None]
    assert len({uid for uid, _, _ in credentials}) == 3 and all(uid >= 65536 for uid, _, _ in credentials)
    assert all(seccomp == "2" and core == "0" for _, seccomp, core in credentials), credentials
    # No capability left, no way back to any (no_new_privs), 256 threads and one per vCPU at most.
    assert all(vmm_confinement(r.pid) == ("0000000000000000", "1", str(MAX_THREADS + r.vcpus))
               for r in records if r.pid is not None), [vmm_confinement(r.pid) for r in records if r.pid]
    # And its environment is the fixed one: nothing of the controller's, its keys least of all.
    assert all(vmm_environment(r.pid) == VMM_ENVIRONMENT for r in records if r.pid is not None)

    for record in records:
        assert asyncio.run(manager.destroy(record.vm_id))
        assert not asyncio.run(manager.destroy(record.vm_id))  # idempotent
    assert leftovers(controllers) == {"taps": [], "vmm processes": [], "vm directories": []}
    assert asyncio.run(manager.all()) == []
    assert Ipam(controller.store, controller.network.plan).leases() == []
    assert run("nft", "-j", "list", "table", "inet", "browservm", netns=controllers.netns).stdout == nft_before


def test_a_vmm_killed_with_sigkill_is_noticed_within_two_seconds_with_its_console_tail(
        controllers: Controllers) -> None:
    manager = controllers.open().manager

    async def kill_and_wait() -> tuple[VmRecord, float]:
        record = await manager.create()
        assert record.state == VmState.READY, record.failure
        noticed: asyncio.Future[VmRecord] = asyncio.get_running_loop().create_future()
        manager.on_failure = noticed.set_result
        assert record.pid is not None
        killed_at = time.monotonic()
        os.kill(record.pid, signal.SIGKILL)
        failed = await asyncio.wait_for(noticed, 2.0)
        return failed, time.monotonic() - killed_at

    failed, delay = asyncio.run(kill_and_wait())
    assert delay < 2.0
    assert failed.state == VmState.FAILED and failed.failure is not None and failed.failure.hop == "vmm.exited"
    assert any("browservm-ready: service=websockify" in line for line in failed.failure.evidence)
    stored = asyncio.run(manager.get(failed.vm_id))
    assert stored is not None and stored.state == VmState.FAILED and not stored.holds_resources
    assert leftovers(controllers)["taps"] == []


def browservm(controllers: Controllers, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "browservm", *args, "--netns", controllers.netns,
                           "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
                           "--rootfs", str(controllers.rootfs), "--vmm", "qemu", "--json"],
                          capture_output=True, text=True, timeout=900, check=False)


def test_a_restarted_controller_finds_its_vms_and_cleans_up_the_one_that_died_meanwhile(
        controllers: Controllers) -> None:
    # Two VMs, each created by a controller process that has exited since; a serving controller killed -9.
    created = [browservm(controllers, "vm", "create") for _ in range(2)]
    assert [c.returncode for c in created] == [0, 0], [c.stderr[-2000:] for c in created]
    survivor, victim = (json.loads(c.stdout) for c in created)
    serving = subprocess.Popen([sys.executable, "-m", "browservm", "serve", "--netns", controllers.netns,
                                "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
                                "--rootfs", str(controllers.rootfs), "--vmm", "qemu", "--listen", "127.0.0.1:0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert serving.stdout is not None
        listening = next(line for line in serving.stdout if line.startswith("serve:"))
        assert "watching 2 VM(s)" in listening, listening
    finally:
        serving.kill()
        serving.wait(timeout=30)
    os.kill(victim["pid"], signal.SIGKILL)  # "destroyed" while no controller runs

    controller = controllers.open()
    manager = controller.manager
    actions = asyncio.run(manager.reconcile())
    assert f"{survivor['vm_id']}: VMM {survivor['pid']} alive, watching" in actions
    assert f"{victim['vm_id']}: the VMM exited while no controller watched it: marked failed and released" in actions

    alive = asyncio.run(manager.get(survivor["vm_id"]))
    assert alive is not None and alive.state == VmState.READY and alive.pid == survivor["pid"]
    address = IPv4Address(survivor["address"].split("/")[0])
    banner = asyncio.run(desktop_banner(controller.network.netns, address, 6080, 30, websocket=True))
    assert banner == "RFB 003.008"  # still usable

    dead = asyncio.run(manager.get(victim["vm_id"]))
    assert dead is not None and dead.state == VmState.FAILED and not dead.holds_resources
    assert leftovers(controllers)["vm directories"] == [survivor["vm_id"]]
    assert [line.split(":")[1].strip().split("@")[0] for line in leftovers(controllers)["taps"]] == [alive.tap]
    leases = Ipam(controller.store, controller.network.plan).leases()
    assert [lease.vm_id for lease in leases] == [survivor["vm_id"]]

    listed = json.loads(browservm(controllers, "vm", "ls").stdout)
    assert {(v["vm_id"], v["state"], v["vmm_alive"]) for v in listed} == {
        (survivor["vm_id"], "ready", True), (victim["vm_id"], "failed", False)}


@pytest.mark.skipif(not FIRECRACKER_RUNS, reason=(
    f"booting under Firecracker needs a firecracker binary and a KVM host that runs ordinary guests: "
    f"{FIRECRACKER_WHY_NOT}. Up to that line everything is tested here: the generated vm-config.json, the jail "
    "and every API body against Firecracker's own specification (tests/unit/test_firecracker_spec.py), and the "
    "same kernel, image and readiness chain under QEMU microvm, Firecracker's device model"))
def test_a_vm_boots_under_firecracker_through_every_hop(controllers: Controllers) -> None:
    manager = controllers.open(vmm="firecracker").manager
    record = asyncio.run(manager.create())
    assert record.state == VmState.READY, record.failure
    assert record.driver == "firecracker" and list(record.stages)[-1] == "desktop.complete"
    assert asyncio.run(manager.destroy(record.vm_id))
    assert leftovers(controllers) == {"taps": [], "vmm processes": [], "vm directories": []}
