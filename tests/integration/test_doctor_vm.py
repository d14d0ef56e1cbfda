"""`browservm doctor` on real guests (QEMU/TCG, minimal image), in a throwaway namespace.

One booted VM is shared by the cases that do not kill it; each case breaks exactly one thing,
asserts the hop and cause code the doctor names, restores it, and checks the VM is OK again.
The two cases that cannot be undone (TAP deleted, VMM killed) come last. The incident (the
no-IP_PNP kernel with the configurator disabled) is a VM of its own, kept after it failed.
Every run must finish within 5 s. The in-guest faults (websockify or x11vnc stopped) are in
test_doctor_standin.py: nothing in the guest lets a test stop them without changing guest files.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from browservm.controller import Controller
from browservm.doctor import Doctor, Report
from browservm.doctor.local import sources
from browservm.guest.netconfig import DISABLE_WORD
from browservm.hostnet.netns import NetworkNamespace
from browservm.images.kernel_build import WITH_IP_PNP, WITHOUT_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from browservm.ipam import Ipam
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState

from .conftest import Controllers, Namespaces, run

pytestmark = [pytest.mark.host, pytest.mark.vm]

BUDGET_S = 5.0
GATEWAY = "192.168.100.1/24"


@dataclass
class Shared:
    controllers: Controllers
    controller: Controller
    record: VmRecord
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ctl(self) -> str:
        name = self.controller.network.netns.name
        assert name is not None
        return name

    def diagnose(self, case: str, vm_id: str | None = None, controller: Controller | None = None) -> Report:
        used = controller or self.controller
        doctor = Doctor(sources(used.settings, network=used.network, records=VmRecords(used.store)))
        started = time.monotonic()
        report = asyncio.run(doctor.vm(vm_id or self.record.vm_id))
        self.timings[case] = elapsed = time.monotonic() - started
        assert elapsed < BUDGET_S, f"{case}: the doctor took {elapsed:.2f} s"
        return report

    def records(self) -> VmRecords:
        return VmRecords(self.controller.store)

    def set_mac(self, mac: str) -> None:
        records = self.records()
        record = records.get(self.record.vm_id)
        assert record is not None
        record.mac = mac
        records.save(record)

    def set_forwarding(self, value: str) -> None:
        with NetworkNamespace(self.ctl).entered():
            Path("/proc/sys/net/ipv4/ip_forward").write_text(value + "\n")

    def reattach(self) -> None:
        lease = Ipam(self.controller.store, self.controller.network.plan).get(self.record.vm_id)
        assert lease is not None
        attach_link = getattr(self.controller.network, "attach_link", None)
        if attach_link is not None:
            attach_link(lease)
            return
        tap = lease.tap
        run("ip", "link", "set", tap, "master", lease.bridge, netns=self.ctl)
        run("bridge", "link", "set", "dev", tap, "isolated", "on", netns=self.ctl)
        run("ip", "link", "set", tap, "up", netns=self.ctl)

    def drop_6080(self) -> None:
        script = ("add table inet intruder\n"
                  "add chain inet intruder input { type filter hook input priority -10; }\n"
                  "add rule inet intruder input tcp sport 6080 drop\n")
        subprocess.run(["ip", "netns", "exec", self.ctl, "nft", "-f", "-"], input=script, text=True, check=True)

    def kill_vmm(self) -> None:
        assert self.record.pid is not None
        os.kill(self.record.pid, signal.SIGKILL)
        for _ in range(50):
            if not Path(f"/proc/{self.record.pid}").exists():
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def shared(built: dict[str, BuiltKernel], minimal_image: RootfsImage,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    spaces = Namespaces()
    controllers = Controllers(spaces, tmp_path_factory.mktemp("doctor") / "state", built[WITH_IP_PNP.name].vmlinux,
                              minimal_image.path)
    try:
        controller = controllers.open()
        record = asyncio.run(controller.manager.create(keep_failed=True))
        assert record.state == VmState.READY, record.failure
        yield Shared(controllers, controller, record)
    finally:
        try:
            controllers.cleanup()
        finally:
            spaces.cleanup()


def test_a_healthy_vm_is_ok_on_every_hop(shared: Shared) -> None:
    report = shared.diagnose("healthy")
    assert report.verdict == "OK", json.dumps(report.to_json(), indent=1)
    assert all(hop.status == "ok" and hop.checked for hop in report.hops)
    guest = report.hop("guest.network")
    assert any("configured by the kernel" in line for line in guest.checked)


Case = tuple[str, str, str, Callable[[Shared], object], Callable[[Shared], object]]
CASES: list[Case] = [
    ("bridge-down", "host.bridge", "bridge.down",
     lambda s: run("ip", "link", "set", "br0", "down", netns=s.ctl),
     lambda s: run("ip", "link", "set", "br0", "up", netns=s.ctl)),
    ("bridge-address-removed", "host.bridge", "bridge.no_address",
     lambda s: run("ip", "addr", "del", GATEWAY, "dev", "br0", netns=s.ctl),
     lambda s: run("ip", "addr", "add", GATEWAY, "dev", "br0", netns=s.ctl)),
    ("tap-detached", "net.tap", "tap.detached",
     lambda s: run("ip", "link", "set", s.record.tap, "nomaster", netns=s.ctl), lambda s: s.reattach()),
    ("tap-down", "net.tap", "tap.down",
     lambda s: run("ip", "link", "set", s.record.tap, "down", netns=s.ctl),
     lambda s: run("ip", "link", "set", s.record.tap, "up", netns=s.ctl)),
    ("forwarding-off", "host.forwarding", "forwarding.off",
     lambda s: s.set_forwarding("0"), lambda s: s.set_forwarding("1")),
    ("nft-table-deleted", "host.firewall", "nft.table_missing",
     lambda s: run("nft", "delete", "table", "inet", "browservm", netns=s.ctl),
     lambda s: s.controller.network.up()),
    ("drop-6080-before-ours", "net.tcp", "firewall.foreign_drop",
     lambda s: s.drop_6080(), lambda s: run("nft", "delete", "table", "inet", "intruder", netns=s.ctl)),
    ("recorded-mac-differs", "vmm.spawn", "mac.mismatch",
     lambda s: s.set_mac("02:fc:00:00:00:01"), lambda s: s.set_mac(s.record.mac)),
]


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_one_fault_on_the_shared_vm_is_named_then_restored(shared: Shared, case: Case) -> None:
    name, hop, cause, breaks, restores = case
    breaks(shared)
    try:
        report = shared.diagnose(name)
    finally:
        restores(shared)
    document = report.to_json()
    assert (document["verdict"], document["hop"], document["cause"]) == ("FAIL", hop, cause), \
        json.dumps(document, indent=1)
    assert document["evidence"] and document["fix"]
    assert shared.diagnose(f"{name}: restored").verdict == "OK"


def test_the_incident_is_named_on_the_kept_failed_vm(shared: Shared, built: dict[str, BuiltKernel]) -> None:
    controller = shared.controllers.open(kernel=built[WITHOUT_IP_PNP.name].vmlinux)
    record = asyncio.run(controller.manager.create(extra_boot_args=(DISABLE_WORD,), keep_failed=True))
    assert record.state == VmState.FAILED
    try:
        document = shared.diagnose("incident", record.vm_id, controller).to_json()
        assert (document["hop"], document["cause"]) == ("guest.network", "kernel.no_ip_pnp"), \
            json.dumps(document, indent=1)
        assert "the kernel ignored ip= (no CONFIG_IP_PNP)" in document["summary"]
        assert any("Unknown kernel command line parameters" in line for line in document["evidence"])
        assert any("CONFIG_IP_PNP=n" in line for line in document["evidence"])
    finally:
        asyncio.run(controller.manager.destroy(record.vm_id))


def test_last_tap_deleted_then_vmm_killed(shared: Shared) -> None:
    run("ip", "link", "del", shared.record.tap, netns=shared.ctl)
    document = shared.diagnose("tap-deleted").to_json()
    assert (document["hop"], document["cause"]) == ("net.tap", "tap.missing"), json.dumps(document, indent=1)
    shared.kill_vmm()
    document = shared.diagnose("vmm-killed").to_json()
    assert (document["hop"], document["cause"]) == ("vmm.spawn", "vmm.dead"), json.dumps(document, indent=1)
    print("\n" + "\n".join(f"{case:<40} {seconds * 1000:7.1f} ms" for case, seconds in shared.timings.items()))
