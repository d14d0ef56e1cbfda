"""`browservm doctor` on real guests (QEMU/TCG, minimal image), in a throwaway namespace.

One booted VM is shared by the cases that do not kill it; each case breaks exactly one thing,
asserts the hop and cause code the doctor names, restores it, and checks the VM is OK again.
The two cases that cannot be undone (TAP deleted, VMM killed) come last. The incident (the
no-IP_PNP kernel with the configurator disabled) is a VM of its own, kept after it failed.
The in-guest faults are VMs of their own too, booted side by side from test-only copies of the
image (tests/support/derived_image.py; the production image and its build stay as they are):
"x11vnc stopped" leaves x11vnc out of the copy's desktop.json, "websockify stopped" replaces
websockify with a stand-in that closes :6080 after the desktop reported it ready.
Every run must finish within 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from browservm.vm.desktop_path import RFB, desktop_path
from browservm.vm.desktop_path import WEBSOCKIFY as WEBSOCKIFY_PATH
from browservm.vm.records import VmRecord, VmRecords
from browservm.vm.state import VmState
from tests.support.derived_image import GuestFile, derive_image, read_guest_file

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

    def on_bridge(self, *argv: str) -> None:
        """`ip argv` on the bridge, then the VM's pinned neighbour entry put back as the doctor's evidence says:
        a link going down, or losing its last address, loses its neighbour entries, permanent ones too."""
        run("ip", *argv, netns=self.ctl)
        address = self.record.address.split("/")[0]
        run("ip", "neigh", "replace", address, "lladdr", self.record.mac, "dev", "br0", "nud", "permanent",
            netns=self.ctl)

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

    def drop_desktop_port(self) -> None:
        """A rule in a table of someone else's drops the VM's desktop port (:5901 on the rfb path)."""
        port = desktop_path(self.record.desktop_path).port
        script = ("add table inet intruder\n"
                  "add chain inet intruder input { type filter hook input priority -10; }\n"
                  f"add rule inet intruder input tcp sport {port} drop\n")
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
     lambda s: run("ip", "link", "set", "br0", "down", netns=s.ctl), lambda s: s.on_bridge("link", "set", "br0", "up")),
    ("bridge-address-removed", "host.bridge", "bridge.no_address",
     lambda s: run("ip", "addr", "del", GATEWAY, "dev", "br0", netns=s.ctl),
     lambda s: s.on_bridge("addr", "add", GATEWAY, "dev", "br0")),
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
    ("drop-desktop-port-before-ours", "net.tcp", "firewall.foreign_drop",
     lambda s: s.drop_desktop_port(), lambda s: run("nft", "delete", "table", "inet", "intruder", netns=s.ctl)),
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


# --- in-guest faults: real guests booted from test-only images (tests/support/derived_image.py) ------

DESKTOP_JSON = "/etc/browservm/desktop.json"
WEBSOCKIFY = "/usr/bin/websockify"
# browservm-desktop hands websockify :6080's listening socket as its stdin and then reports it ready.
# This stand-in closes that socket and stays alive: nothing listens on :6080 (TCP refused) although the
# console said websockify was ready, and the supervisor sees no part exit (it would restart the desktop).
WEBSOCKIFY_GONE = b"""#!/bin/sh
# test-only (tests/integration/test_doctor_vm.py): websockify stopped, :6080 closed
exec sleep infinity <&-
"""
# The seed's x11vnc: listening on localhost only. It starts, says PORT= and is reported ready, but
# the controller's connection to the guest's :5901 is refused (earlier in PATH than Debian's).
X11VNC_LOCALHOST = b"""#!/bin/sh
# test-only (tests/integration/test_doctor_vm.py): x11vnc on localhost only
exec /usr/bin/x11vnc "$@" -localhost
"""


def desktop_without(image: Path, service: str) -> dict[str, GuestFile]:
    """The image's desktop.json with `service` left out of "services", every other key as it was."""
    config = json.loads(read_guest_file(image, DESKTOP_JSON))
    assert service in config["services"], config
    config["services"] = [part for part in config["services"] if part != service]
    return {DESKTOP_JSON: GuestFile(json.dumps(config).encode() + b"\n")}


@dataclass(frozen=True)
class InGuestFault:
    name: str
    path: str  # the VM's desktop path (vm/desktop_path.py): which hops it passes
    hop: str  # what the doctor must name
    cause: str
    create_hops: tuple[str, ...]  # where the create itself may fail
    files: Callable[[Path], dict[str, GuestFile]]  # what the derived image changes, given the built image


IN_GUEST = [
    # Not by leaving websockify out of desktop.json: a websockify that never starts is never reported
    # ready, and the doctor rightly stops at desktop.ready (desktop.not_ready) before any connect.
    # The create may still connect between the ready marker and the stand-in closing the socket:
    # that connection is reset, so it fails at ws.upgrade instead of net.tcp.
    InGuestFault("websockify-stopped", WEBSOCKIFY_PATH, "net.tcp", "desktop.port_closed", ("net.tcp", "ws.upgrade"),
                 lambda image: {WEBSOCKIFY: GuestFile(WEBSOCKIFY_GONE, 0o755)}),
    # websockify starts and upgrades, then finds nothing on 127.0.0.1:5901 and closes the WebSocket.
    InGuestFault("x11vnc-stopped", WEBSOCKIFY_PATH, "rfb.banner", "vnc.unreachable", ("rfb.banner",),
                 lambda image: desktop_without(image, "x11vnc")),
    InGuestFault("x11vnc-localhost-only", RFB, "net.tcp", "desktop.port_closed", ("net.tcp",),
                 lambda image: {"/usr/local/bin/x11vnc": GuestFile(X11VNC_LOCALHOST, 0o755)}),
]


InGuestVms = dict[str, tuple[Controller, VmRecord]]


@contextlib.contextmanager
def in_guest_vms_booted(controllers: Controllers, source: Path, directory: Path) -> Iterator[InGuestVms]:
    """One VM per in-guest fault, each from its own image derived from `source` (made in `directory`),
    booted side by side and kept after its create fails (its VMM keeps running); destroyed, and the
    images deleted, even on failure. Also used by bench/doctor_bench.py --real-guests."""
    images = [directory / f"{fault.name}.ext4" for fault in IN_GUEST]
    opened: dict[str, Controller] = {}
    before: set[str] | None = None  # the VMs there were before (the shared one): never destroyed here
    try:
        for fault, image in zip(IN_GUEST, images, strict=True):
            derive_image(source, image, fault.files(source))
            opened[fault.name] = controllers.open(rootfs=image)
            opened[fault.name].manager.desktop_path = desktop_path(fault.path)
        before = {record.vm_id for record in asyncio.run(next(iter(opened.values())).manager.all())}

        async def boot() -> list[VmRecord]:
            # Side by side: three guests under TCG on 2 cores take little longer than one.
            return await asyncio.gather(*(c.manager.create(keep_failed=True) for c in opened.values()))

        started = time.monotonic()
        records = asyncio.run(boot())
        print(f"\nin-guest fault VMs: every create ended in {time.monotonic() - started:.0f} s")
        yield {name: (opened[name], record) for name, record in zip(opened, records, strict=True)}
    finally:
        try:
            if before is not None:
                manager = next(iter(opened.values())).manager
                for record in asyncio.run(manager.all()):
                    if record.vm_id not in before:
                        asyncio.run(manager.destroy(record.vm_id))
        finally:
            for image in images:
                image.unlink(missing_ok=True)


@pytest.fixture
def in_guest_vms(shared: Shared, minimal_image: RootfsImage, tmp_path: Path) -> Iterator[InGuestVms]:
    with in_guest_vms_booted(shared.controllers, minimal_image.path, tmp_path) as vms:
        yield vms


def test_in_guest_faults_are_named_on_real_guests(shared: Shared, in_guest_vms: InGuestVms) -> None:
    documents = {name: shared.diagnose(name, record.vm_id, controller).to_json()
                 for name, (controller, record) in in_guest_vms.items()}
    found = {name: (document["verdict"], document["hop"], document["cause"]) for name, document in documents.items()}
    assert found == {f.name: ("FAIL", f.hop, f.cause) for f in IN_GUEST}, json.dumps(documents, indent=1)
    for fault in IN_GUEST:
        record, document = in_guest_vms[fault.name][1], documents[fault.name]
        # The create failed too, past desktop.ready: the guest's desktop came that far.
        assert record.state == VmState.FAILED and record.failure is not None, record
        assert record.failure.hop in fault.create_hops, (fault.name, record.failure)
        statuses = [(h["hop"], h["status"]) for h in document["hops"]]
        at = [h for h, _ in statuses].index(fault.hop)
        assert all(status == "ok" for _, status in statuses[:at]), (fault.name, statuses)
        assert all(status == "skipped" for _, status in statuses[at + 1:]), (fault.name, statuses)
        assert document["evidence"] and document["fix"], (fault.name, document)


def test_last_tap_deleted_then_vmm_killed(shared: Shared) -> None:
    run("ip", "link", "del", shared.record.tap, netns=shared.ctl)
    document = shared.diagnose("tap-deleted").to_json()
    assert (document["hop"], document["cause"]) == ("net.tap", "tap.missing"), json.dumps(document, indent=1)
    shared.kill_vmm()
    document = shared.diagnose("vmm-killed").to_json()
    assert (document["hop"], document["cause"]) == ("vmm.spawn", "vmm.dead"), json.dumps(document, indent=1)
    print("\n" + "\n".join(f"{case:<40} {seconds * 1000:7.1f} ms" for case, seconds in shared.timings.items()))
