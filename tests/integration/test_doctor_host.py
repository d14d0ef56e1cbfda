"""`browservm doctor` without any VM: what every VM would depend on and boot with.

Builds nothing: the kernels are the cached ones of the `built` fixture, the golden image the
cached minimal one, and "an image without the configurator" a few-KiB ext4 made with
`mkfs.ext4 -d` from an empty tree (no loop mount). Each run must finish within 5 s.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.doctor import Doctor, DriverVmms, Report, Sources
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.images.kernel_build import WITH_IP_PNP, WITHOUT_IP_PNP, BuiltKernel
from browservm.images.rootfs import RootfsImage
from browservm.netplan import NetworkPlan
from browservm.store import Store
from browservm.vmm import firecracker

from .conftest import Namespaces, run

pytestmark = pytest.mark.host
BUDGET_S = 5.0


def host_report(netns: str, *, network: HostNetwork | None = None, uplink: str | None = None,
                vmm: str = "qemu", kernel: Path | None = None, rootfs: Path | None = None,
                qemu: str = "qemu-system-x86_64") -> Report:
    plan = network.plan if network is not None else NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", uplink)
    doctor = Doctor(Sources(plan=plan, netns=NetworkNamespace(netns), vmm_choice=vmm, kernel=kernel, rootfs=rootfs,
                            status=None if network is None else network.status, record=None, records=None,
                            vmms=DriverVmms(), qemu=qemu, expected=None if network is None else network.expected))
    started = time.monotonic()
    report = asyncio.run(doctor.host())
    assert time.monotonic() - started < BUDGET_S
    return report


@pytest.fixture
def empty_image(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "usr/lib/browservm/bin").mkdir(parents=True)
    image = tmp_path / "no-configurator.ext4"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "4M"], check=True, capture_output=True)
    return image


@pytest.fixture
def host_up(namespaces: Namespaces, tmp_path: Path) -> Iterator[HostNetwork]:
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", "uplink0")
    with Store(tmp_path / "state.sqlite3") as store, \
            HostNetwork(plan, store, NetworkNamespace(namespaces.name())) as network:
        try:
            network.up()
            yield network
        finally:
            network.down(force=True)


def verdict(report: Report) -> tuple[str, str | None, str | None]:
    document = report.to_json()
    return document["verdict"], document["hop"], document["cause"]


def test_a_kernel_without_ip_pnp_and_an_image_without_configurator_are_found_before_any_vm_boots(
        built: dict[str, BuiltKernel], minimal_image: RootfsImage, empty_image: Path) -> None:
    no_pnp, pnp = built[WITHOUT_IP_PNP.name].vmlinux, built[WITH_IP_PNP.name].vmlinux
    # Each alone is covered by the other: a warning.
    alone = host_report("bvt-doctor-absent", kernel=no_pnp, rootfs=minimal_image.path)
    assert (alone.hop("host.kernel").status, alone.hop("host.kernel").cause) == ("warn", "kernel.no_ip_pnp")
    assert alone.hop("host.image").status == "ok"
    image_alone = host_report("bvt-doctor-absent", kernel=pnp, rootfs=empty_image)
    assert (image_alone.hop("host.image").status, image_alone.hop("host.image").cause) == \
        ("warn", "guest.no_configurator")
    # Together: every VM would come up unreachable.
    both = host_report("bvt-doctor-absent", kernel=no_pnp, rootfs=empty_image)
    image = both.hop("host.image")
    assert (image.status, image.cause) == ("fail", "guest.no_network_config"), json.dumps(both.to_json(), indent=1)
    assert both.hop("host.kernel").cause == "kernel.no_ip_pnp"


def test_no_usable_vmm(namespaces: Namespaces) -> None:
    report = host_report("bvt-doctor-absent", qemu="qemu-system-none")
    assert (report.hop("host.vmm").status, report.hop("host.vmm").cause) == ("fail", "vmm.missing")
    usable, _ = firecracker.available()
    if not usable:  # here: no firecracker binary or no usable /dev/kvm
        report = host_report("bvt-doctor-absent", vmm="firecracker")
        assert report.hop("host.vmm").status == "fail"
        assert report.hop("host.vmm").cause in ("vmm.missing", "vmm.unusable")


def test_a_missing_namespace_is_named(namespaces: Namespaces) -> None:
    assert verdict(host_report(namespaces.name())) == ("FAIL", "host.netns", "netns.missing")


def test_the_uplink_missing_and_then_a_healthy_host(host_up: HostNetwork) -> None:
    assert host_up.netns.name is not None
    report = host_report(host_up.netns.name, network=host_up)
    assert verdict(report) == ("FAIL", "host.uplink", "uplink.missing"), json.dumps(report.to_json(), indent=1)
    run("ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p", netns=host_up.netns.name)
    run("ip", "link", "set", "uplink0", "up", netns=host_up.netns.name)
    report = host_report(host_up.netns.name, network=host_up)
    assert report.verdict == "OK", json.dumps(report.to_json(), indent=1)

