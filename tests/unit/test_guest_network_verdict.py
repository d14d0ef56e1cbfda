"""guest.network's verdict from a console with no network line: silence is told apart from a guest
without networking, and the IP_PNP hint is given only with its evidence (the seed's incident: the
kernel printing that it ignored ip=). Real consoles: tests/integration/test_guest_boot.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from browservm.errors import ProbeFailed
from browservm.vm import hops
from browservm.vm.console import ConsoleLog
from browservm.vm.readiness import wait_guest_network

KERNEL = ["[    0.000000] Linux version 6.1.192", "[    0.61] x86/fpu: Supporting XSAVE feature 0x080"]
IGNORED = '[    0.000000] Unknown kernel command line parameters "ip=192.168.100.2::192.168.100.1:255.255.255.0", ' \
          'will be passed to user space.'
USERSPACE = ["[    0.91] Run /usr/lib/browservm/overlay-init as init process", "browservm-disk: status=ok"]


def verdict(tmp_path: Path, lines: list[str]) -> ProbeFailed:
    console = tmp_path / "console.log"
    console.write_text("".join(f"{line}\n" for line in lines))
    with pytest.raises(ProbeFailed) as failed:
        asyncio.run(wait_guest_network(ConsoleLog(console), 0.2))
    assert failed.value.hop == hops.GUEST_NETWORK
    return failed.value


def test_an_empty_console_says_the_kernel_never_printed(tmp_path: Path) -> None:
    failed = verdict(tmp_path, [])
    assert "stayed empty" in failed.reason and failed.hint is None


def test_a_kernel_that_stopped_before_userspace_is_named_with_its_last_line_and_no_ip_pnp_hint(tmp_path: Path) -> None:
    failed = verdict(tmp_path, KERNEL)
    assert "stopped before userspace" in failed.reason and "XSAVE feature 0x080" in failed.reason
    assert "CONFIG_IP_PNP" not in failed.reason and failed.hint is None


def test_the_kernel_ignoring_ip_gives_the_ip_pnp_hint_with_the_line(tmp_path: Path) -> None:
    failed = verdict(tmp_path, [IGNORED, *KERNEL, *USERSPACE])
    assert "without CONFIG_IP_PNP" in failed.reason and IGNORED.strip() in failed.reason
    assert failed.hint == hops.IP_PNP_HINT


def test_a_userspace_that_never_configured_eth0_says_so(tmp_path: Path) -> None:
    failed = verdict(tmp_path, [*KERNEL, *USERSPACE])
    assert "userspace started" in failed.reason and "browservm-disk: status=ok" in failed.reason
    assert failed.hint is None
