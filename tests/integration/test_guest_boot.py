"""Real guests under QEMU (TCG here), in a throwaway namespace: the incident, reproduced and ended.

(a) kernel with IP_PNP, configurator off      -> reachable: the kernel applied ip=
(b) kernel without IP_PNP, configurator off   -> the incident: boots, desktop starts, unreachable
(c) kernel without IP_PNP, configurator on    -> reachable: browservm-net applied ip=
Reachable means every hop passed: ARP answered with the VM's MAC, :6080 accepts, the WebSocket
upgrade is answered and the minimal image's x11vnc says "RFB 003.008" through websockify.
"""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Address

import pytest

from browservm.errors import ProbeFailed
from browservm.guest.markers import parse_marker
from browservm.guest.netconfig import DISABLE_WORD
from browservm.images.kernel_build import WITHOUT_IP_PNP, BuiltKernel
from browservm.vm.readiness import arp_probe, open_tcp
from browservm.vm.state import VmState

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]

# The default desktop path (rfb): straight to x11vnc, no WebSocket upgrade.
HOPS = ["net.lease", "net.tap", "disk.clone", "vmm.spawn", "guest.network", "net.arp", "desktop.ready",
        "net.tcp", "rfb.banner", "desktop.complete"]


def test_a_kernel_with_ip_pnp_configures_the_guest_itself(controllers: Controllers) -> None:
    manager = controllers.open().manager
    record = asyncio.run(manager.create(extra_boot_args=(DISABLE_WORD,)))
    assert record.state == VmState.READY, record.failure
    assert list(record.stages) == HOPS
    assert record.guest_network_by == "kernel"
    assert any("IP-Config: Complete" in line for line in manager.console(record.vm_id).tail(10_000))


def test_b_without_ip_pnp_and_without_configurator_the_incident_is_reproduced_and_named(
        controllers: Controllers, built: dict[str, BuiltKernel]) -> None:
    controller = controllers.open(kernel=built[WITHOUT_IP_PNP.name].vmlinux)
    manager = controller.manager
    record = asyncio.run(manager.create(extra_boot_args=(DISABLE_WORD,), keep_failed=True))

    assert record.state == VmState.FAILED and record.failure is not None
    assert record.failure.hop == "guest.network"
    assert "the kernel ignored ip= (it was built without CONFIG_IP_PNP)" in record.failure.reason
    assert "CONFIG_IP_PNP" in record.failure.hint
    console = manager.console(record.vm_id)
    assert any('Unknown kernel command line parameters' in line and "ip=" in line for line in console.tail(10_000))

    async def unreachable_although_the_desktop_runs() -> None:
        # As in the incident: every service in the guest starts ...
        ready = await console.wait_for(lambda line: (m := parse_marker(line)) is not None
                                       and m[1].get("service") == "websockify", 300)
        assert ready is not None, "the guest's desktop never started"
        # ... and still nobody on the host can reach it.
        address = IPv4Address(record.address.split("/")[0])
        with pytest.raises(ProbeFailed, match="no ARP reply"):
            await arp_probe(controller.network.netns, record.bridge, IPv4Address(record.gateway), address, 3)
        with pytest.raises(ProbeFailed) as excinfo:
            await open_tcp(controller.network.netns, address, 6080, 5)
        assert excinfo.value.hop == "net.tcp"

    asyncio.run(unreachable_although_the_desktop_runs())


def test_c_without_ip_pnp_the_configurator_makes_the_guest_reachable(
        controllers: Controllers, built: dict[str, BuiltKernel]) -> None:
    manager = controllers.open(kernel=built[WITHOUT_IP_PNP.name].vmlinux).manager
    record = asyncio.run(manager.create())
    assert record.state == VmState.READY, record.failure
    assert record.guest_network_by == "configurator"
    lines = manager.console(record.vm_id).tail(10_000)
    assert any("Unknown kernel command line parameters" in line for line in lines)  # the kernel did ignore it
    assert any("browservm-net: status=ok" in line and "by=configurator" in line for line in lines)
