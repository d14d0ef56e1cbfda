"""The configurator's decisions, against a recording fake of the network operations."""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest

from browservm.guest.bootargs import IpConfig, parse_ip_config
from browservm.guest.markers import parse_marker
from browservm.guest.netconfig import NetError, configure, main

STATIC = "192.168.100.3::192.168.100.1:255.255.255.0:vm-1:eth0:off:192.168.100.1"


class FakeNet:
    def __init__(self, devices: Sequence[str] = ("eth0",), up: bool = False,
                 addresses: Sequence[str] = (), gateway: str | None = None, fail_on: str | None = None) -> None:
        self._devices = list(devices)
        self._up = up
        self._addresses = [IPv4Interface(a) for a in addresses]
        self._gateway = IPv4Address(gateway) if gateway else None
        self._fail_on = fail_on
        self.calls: list[str] = []

    def _call(self, what: str) -> None:
        self.calls.append(what)
        if self._fail_on and what.startswith(self._fail_on):
            raise NetError(f"{what}: RTNETLINK answers: Operation not permitted")

    def devices(self) -> list[str]:
        return self._devices

    def wait_for_device(self, name: str, timeout: float) -> bool:
        return name in self._devices

    def state(self, name: str) -> tuple[bool, list[IPv4Interface]]:
        return self._up, self._addresses

    def default_gateway(self) -> IPv4Address | None:
        return self._gateway

    def set_up(self, name: str) -> None:
        self._call(f"up {name}")

    def add_address(self, name: str, address: IPv4Interface) -> None:
        self._call(f"addr {address} {name}")

    def set_default_route(self, gateway: IPv4Address, name: str) -> None:
        self._call(f"route {gateway} {name}")

    def set_hostname(self, hostname: str) -> None:
        self._call(f"hostname {hostname}")

    def write_resolv_conf(self, servers: Sequence[IPv4Address]) -> None:
        self._call(f"resolv {' '.join(map(str, servers))}")


def test_without_ip_pnp_the_configurator_does_what_the_kernel_did_not() -> None:
    net = FakeNet()
    outcome = configure(parse_ip_config(STATIC), net)
    assert (outcome.status, outcome.by) == ("ok", "configurator")
    assert outcome.address == IPv4Interface("192.168.100.3/24")
    assert net.calls == ["up lo", "up eth0", "addr 192.168.100.3/24 eth0", "route 192.168.100.1 eth0",
                         "hostname vm-1", "resolv 192.168.100.1"]
    topic, fields = parse_marker("[    2.345678] " + outcome.marker()) or ("", {})
    assert topic == "net"
    assert fields == {"status": "ok", "device": "eth0", "address": "192.168.100.3/24",
                      "gateway": "192.168.100.1", "by": "configurator"}


def test_with_ip_pnp_it_changes_nothing_and_says_the_kernel_did_it() -> None:
    net = FakeNet(up=True, addresses=["192.168.100.3/24"], gateway="192.168.100.1")
    outcome = configure(parse_ip_config(STATIC), net)
    assert (outcome.status, outcome.by) == ("ok", "kernel")
    assert net.calls == []


def test_a_half_configured_device_is_completed() -> None:
    net = FakeNet(up=True, addresses=["192.168.100.3/24"], gateway=None)
    outcome = configure(parse_ip_config(STATIC), net)
    assert outcome.by == "configurator"
    assert "route 192.168.100.1 eth0" in net.calls
    assert not any(call.startswith("addr") for call in net.calls)


def test_a_missing_device_fails_with_the_reason() -> None:
    outcome = configure(parse_ip_config(STATIC), FakeNet(devices=["eth1"]), timeout=0.5)
    assert outcome.status == "failed"
    assert outcome.reason == "device eth0 did not appear within 0.5 s"


def test_a_failing_step_is_reported_not_raised() -> None:
    outcome = configure(parse_ip_config(STATIC), FakeNet(fail_on="route"))
    assert outcome.status == "failed" and "Operation not permitted" in (outcome.reason or "")


@pytest.mark.parametrize(("value", "status", "reason"), [
    (None, "skipped", "no ip= argument"),
    ("off", "skipped", "ip=off"),
    ("dhcp", "failed", "asks for dhcp autoconfiguration, which the kernel did not do"),
])
def test_dynamic_and_absent_forms(value: str | None, status: str, reason: str) -> None:
    cfg = None if value is None else parse_ip_config(value)
    outcome = configure(cfg, FakeNet())
    assert outcome.status == status and reason in (outcome.reason or "")


def test_dhcp_done_by_the_kernel_is_recognised() -> None:
    net = FakeNet(up=True, addresses=["10.0.2.15/24"], gateway="10.0.2.2")
    outcome = configure(parse_ip_config("dhcp"), net)
    assert (outcome.status, outcome.by, str(outcome.address)) == ("ok", "kernel", "10.0.2.15/24")


def test_no_device_named_and_one_present_uses_it_with_a_classful_netmask() -> None:
    net = FakeNet(devices=["ens3"])
    outcome = configure(IpConfig(client=IPv4Address("10.1.2.3")), net)
    assert outcome.device == "ens3" and outcome.address == IPv4Interface("10.1.2.3/8")


def test_main_prints_one_marker_and_honours_the_off_switch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 ip={STATIC} browservm.net=off\n")
    assert main(["--cmdline-file", str(cmdline)]) == 0
    assert parse_marker(capsys.readouterr().out) == ("net", {"status": "disabled", "reason": "browservm.net=off"})
    cmdline.write_text("console=ttyS0 ip=10.0.0.2:::255.0.255.0\n")
    assert main(["--cmdline-file", str(cmdline)]) == 1
    _, fields = parse_marker(capsys.readouterr().out) or ("", {})
    assert fields["status"] == "failed" and "netmask" in fields["reason"]
