from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from browservm.config import load_settings
from browservm.errors import InvalidInput
from browservm.netplan import NetworkPlan


def test_a_slash_24_is_one_bridge_with_the_gateway_at_dot_one() -> None:
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    assert plan.bridges == ("br0",)
    assert plan.segments[0].gateway == IPv4Interface("192.168.100.1/24")
    assert plan.capacity == 253


def test_a_slash_20_serves_four_thousand_vms_on_four_bridges_of_at_most_1024_ports() -> None:
    plan = NetworkPlan.build(IPv4Network("10.20.0.0/20"), "br0")
    assert plan.bridges == ("br0", "br0-1", "br0-2", "br0-3")
    assert plan.capacity >= 4000
    assert all(segment.capacity + 1 <= 1024 for segment in plan.segments)
    assert plan.segment_of(IPv4Address("10.20.9.9")) == plan.segments[2]
    assert plan.segment_of(IPv4Address("10.21.0.1")) is None


def test_bridge_macs_are_fixed_and_distinct() -> None:
    plan = NetworkPlan.build(IPv4Network("10.20.0.0/20"), "br0")
    macs = [segment.bridge_mac for segment in plan.segments]
    assert len(set(macs)) == 4 and all(mac.startswith("02:fd:") for mac in macs)
    assert macs == [s.bridge_mac for s in NetworkPlan.build(IPv4Network("10.20.0.0/20"), "br0").segments]


def test_a_bridge_name_with_no_room_for_the_segment_suffix_is_refused() -> None:
    with pytest.raises(InvalidInput) as excinfo:
        NetworkPlan.build(IPv4Network("10.0.0.0/16"), "bridge-of-vms")
    assert excinfo.value.field == "bridge"


def test_the_uplink_cannot_be_a_vm_bridge() -> None:
    with pytest.raises(InvalidInput) as excinfo:
        NetworkPlan.build(IPv4Network("10.0.0.0/24"), "br0", uplink="br0")
    assert excinfo.value.field == "uplink"


@pytest.mark.parametrize(("overrides", "field", "reason"), [
    ({"subnet": IPv4Network("10.0.0.0/31")}, "subnet", "between /16 and /30"),
    ({"bridge": "a" * 16}, "bridge", "interface name"),
    ({"netns": "../x"}, "netns", "letters, digits"),
    ({"vmm_user": "no-such-user-here"}, "vmm_user", "no such user"),
    ({"guest_ports": (0,)}, "guest_ports", "not a TCP port"),
])
def test_bad_settings_name_the_field(overrides: dict[str, object], field: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        load_settings(**overrides)
    assert excinfo.value.field == field
    assert reason in str(excinfo.value)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_SUBNET", "10.5.0.0/24")
    monkeypatch.setenv("BROWSERVM_NETNS", "bvm")
    settings = load_settings(netns=None)
    assert settings.subnet == IPv4Network("10.5.0.0/24") and settings.netns == "bvm"
