"""Fixtures for tests against real kernel objects, each inside namespaces it creates.

Every namespace a test makes is deleted afterwards, even when the test fails,
and the host's own namespace is compared before and after each test: links,
addresses, routes, nftables ruleset and forwarding must be exactly as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from browservm.config import Settings, load_settings
from browservm.controller import Controller, open_controller
from browservm.hostnet.netns import NetworkNamespace
from browservm.images.kernel_build import (
    WITH_IP_PNP,
    WITHOUT_IP_PNP,
    BuiltKernel,
    KernelBuilder,
)
from browservm.images.rootfs import RootfsBuilder, RootfsImage
from browservm.progress import Progress
from browservm.runner import CommandRunner
from browservm.vm.parts import Deadlines

_counter = itertools.count()


def run(*argv: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, check=check, timeout=60)


# Each VM reserves room for its whole disk (vm/create.py Creator._check_room): many VMs at once fit on small CI disks.
TEST_DISK_MIB = 1024
_VOLATILE = {"stats64", "operstate", "linkmode", "valid_life_time", "preferred_life_time", "expires"}


def _without_volatile(value: object) -> object:
    """Drop what changes on its own (counters, address and route lifetimes)."""
    if isinstance(value, dict):
        return {k: _without_volatile(v) for k, v in value.items() if k not in _VOLATILE}
    if isinstance(value, list):
        return [_without_volatile(v) for v in value]
    return value


def _host_snapshot() -> dict[str, object]:
    def ip_json(*args: str) -> object:
        return _without_volatile(json.loads(run("ip", "-j", *args).stdout or "[]"))
    return {
        "links": ip_json("link", "show"),
        "addresses": ip_json("addr", "show"),
        "routes": ip_json("route", "show", "table", "all"),
        "nft": run("nft", "list", "ruleset").stdout,
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


@pytest.fixture(autouse=True)
def host_namespace_untouched() -> Iterator[None]:
    before = _host_snapshot()
    yield
    assert _host_snapshot() == before, "the test changed the host's own network namespace"


class Namespaces:
    """Hands out fresh namespace names and deletes every one of them at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def name(self, role: str = "ctl") -> str:
        name = f"bvt-{os.getpid()}-{next(_counter)}-{role}"
        self.names.append(name)
        return name

    def create(self, role: str = "ctl") -> str:
        name = self.name(role)
        run("ip", "netns", "add", name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            NetworkNamespace(name).delete()


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.cleanup()
        leftovers = [n for n in spaces.names if NetworkNamespace(n).exists()]
        assert not leftovers, f"namespaces left behind: {leftovers}"


# --- built artefacts, once per session and cached by content across sessions ---------------

@pytest.fixture(scope="session")
def builder() -> KernelBuilder:
    return KernelBuilder.packaged(CommandRunner(), Progress())


@pytest.fixture(scope="session")
def built(builder: KernelBuilder) -> dict[str, BuiltKernel]:
    """Our kernel with and without CONFIG_IP_PNP: ~5 minutes the first time on 2 cores, then cached."""
    return {variant.name: builder.build(variant) for variant in (WITH_IP_PNP, WITHOUT_IP_PNP)}


@pytest.fixture(scope="session")
def minimal_image() -> RootfsImage:
    """The golden image without Chromium: about a minute the first time, then cached."""
    return RootfsBuilder(CommandRunner(), Progress()).build("minimal")


@pytest.fixture(scope="session")
def full_image() -> RootfsImage:
    """The golden image with Chromium, what a person sees: about three minutes the first time, then cached."""
    return RootfsBuilder(CommandRunner(), Progress()).build("full")


@pytest.fixture(scope="session")
def oauth_image() -> RootfsImage:
    """The golden image with the agent, xterm, Node and the three tools: several minutes the first time."""
    return RootfsBuilder(CommandRunner(), Progress()).build("oauth")


# --- a controller in a namespace of its own, with real guests under QEMU --------------------

class Controllers:
    """Opens controllers on a throwaway namespace and state directory; at the end destroys every VM,
    kills any VMM left under the state directory, and takes the host network down."""

    def __init__(self, namespaces: Namespaces, state_dir: Path, kernel: Path, rootfs: Path) -> None:
        self.netns = namespaces.name("vms")
        self.state_dir = state_dir
        self.kernel = kernel
        self.rootfs = rootfs
        self._stack = contextlib.ExitStack()

    def settings(self, kernel: Path | None = None, vmm: str = "qemu", rootfs: Path | None = None,
                 accel: str = "auto") -> Settings:
        return load_settings(netns=self.netns, state_dir=self.state_dir, kernel=kernel or self.kernel,
                             rootfs=rootfs or self.rootfs, vmm=vmm, max_vms_per_user=8,
                             disk_mib=TEST_DISK_MIB, accel=accel)

    def open(self, kernel: Path | None = None, deadlines: Deadlines | None = None, vmm: str = "qemu",
             rootfs: Path | None = None, accel: str = "auto") -> Controller:
        """A controller on this namespace and state directory; `kernel` and `rootfs` replace the defaults
        for the VMs it creates (a test-only image, say)."""
        controller = self._stack.enter_context(open_controller(self.settings(kernel, vmm, rootfs, accel),
                                                               deadlines=deadlines))
        controller.network.up()
        return controller

    def cleanup(self) -> None:
        try:
            with open_controller(self.settings()) as controller:
                for record in asyncio.run(controller.manager.all()):
                    asyncio.run(controller.manager.destroy(record.vm_id))
                controller.network.down(force=True)
        finally:
            for pid in vmm_pids_under(self.state_dir):
                os.kill(pid, signal.SIGKILL)
            self._stack.close()


def vmm_pids_under(state_dir: Path) -> list[int]:
    """VMM processes started for VMs of this state directory (their command line names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            vmm = b"qemu-system" in cmdline or b"firecracker" in cmdline
            if vmm and str(state_dir).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def cleaned_up(spaces: Controllers) -> Iterator[Controllers]:
    try:
        yield spaces
    finally:
        spaces.cleanup()


@pytest.fixture
def controllers(namespaces: Namespaces, tmp_path: Path, built: dict[str, BuiltKernel],
                minimal_image: RootfsImage) -> Iterator[Controllers]:
    with cleaned_up(Controllers(namespaces, tmp_path / "state", built[WITH_IP_PNP.name].vmlinux,
                                minimal_image.path)) as spaces:
        yield spaces


@pytest.fixture
def oauth_controllers(namespaces: Namespaces, tmp_path: Path, built: dict[str, BuiltKernel],
                      oauth_image: RootfsImage) -> Iterator[Controllers]:
    """As `controllers`, with the oauth image (the agent and the profile keeper in it)."""
    with cleaned_up(Controllers(namespaces, tmp_path / "state", built[WITH_IP_PNP.name].vmlinux,
                                oauth_image.path)) as spaces:
        yield spaces
