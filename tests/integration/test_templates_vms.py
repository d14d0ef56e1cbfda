"""Templates with real guests under QEMU (issue 21): one controller boots VMs of two templates, each from
its own image, at its own size, and each record names its template; a template's own egress policy is on its
VM's port."""

from __future__ import annotations

import asyncio
import json
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from browservm.controller import open_controller
from browservm.egress import EgressPolicy
from browservm.hostnet.firewall import listed_egress
from browservm.hostnet.host import FIREWALL
from browservm.images.rootfs import RootfsImage
from browservm.templates import DEFAULT
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState

from .conftest import Controllers, run

pytestmark = [pytest.mark.host, pytest.mark.vm]


def vmm_argv(pid: int) -> list[str]:
    return [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if arg]


def test_one_controller_boots_vms_of_two_templates_each_from_its_own_image(
        controllers: Controllers, full_image: RootfsImage, tmp_path: Path) -> None:
    templates = tmp_path / "templates.toml"
    templates.write_text(f'[templates.browser]\nrootfs = "{full_image.path}"\nmem_mib = 1280\n'
                         'egress = "none"\negress_allow = ["10.20.0.0/16"]\n')
    # The default template is the fixture's: the minimal image.
    settings = controllers.settings().model_copy(update={"templates": templates})
    with open_controller(settings) as controller:
        controller.network.up()
        manager = controller.manager

        async def both() -> list[VmRecord]:
            return list(await asyncio.gather(manager.create("ann"), manager.create("ann", template="browser")))

        plain, browser = asyncio.run(both())
        try:
            assert (plain.state, browser.state) == (VmState.READY, VmState.READY), (plain.failure, browser.failure)
            assert (plain.template, plain.mem_mib) == (DEFAULT, 1024)
            assert (browser.template, browser.mem_mib) == ("browser", 1280)
            assert plain.pid is not None and browser.pid is not None
            plain_argv, browser_argv = " ".join(vmm_argv(plain.pid)), " ".join(vmm_argv(browser.pid))
            assert str(controllers.rootfs) in plain_argv and str(full_image.path) not in plain_argv
            assert str(full_image.path) in browser_argv and str(controllers.rootfs) not in browser_argv
            stored = {r.vm_id: r.template for r in asyncio.run(manager.all())}
            assert stored == {plain.vm_id: DEFAULT, browser.vm_id: "browser"}
            # The browser template's own egress policy is on its VM's port, and only there.
            listing = json.loads(run("nft", "-j", "list", "table", "bridge", "browservm",
                                     netns=controllers.netns).stdout)["nftables"]
            policies = listed_egress(listing)
            assert set(policies) == {browser.tap}
            assert policies[browser.tap] == EgressPolicy(internet=False, allow=(IPv4Network("10.20.0.0/16"),))
            firewall = next(c for c in controller.network.status() if c.piece == FIREWALL)
            assert firewall.ok, firewall.detail
        finally:
            for record in (plain, browser):
                asyncio.run(manager.destroy(record.vm_id))
