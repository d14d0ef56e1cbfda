"""The nftables tables as values: what `render_ruleset` asks for, without a kernel."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest

from browservm.config import load_settings
from browservm.errors import InvalidInput
from browservm.hostnet.firewall import (
    VM_PORT_GROUP,
    VmPort,
    listed_ports,
    normalise_listing,
    render_ruleset,
    vm_elements,
)
from browservm.netplan import NetworkPlan


def plan(**kwargs: Any) -> NetworkPlan:
    return NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0", **kwargs)


def comments(objects: list[dict[str, Any]], family: str) -> list[str]:
    return [o["rule"]["comment"] for o in objects if "rule" in o and o["rule"]["family"] == family]


def sets(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["set"]["name"]: o["set"] for o in objects if "set" in o}


def test_both_tables_are_rendered_and_vm_ports_are_recognised_by_their_group() -> None:
    objects = render_ruleset(plan())
    assert {(o["table"]["family"], o["table"]["name"]) for o in objects if "table" in o} == {
        ("inet", "browservm"), ("bridge", "browservm")}
    first = next(o["rule"] for o in objects if "rule" in o and o["rule"]["family"] == "bridge")
    assert first["expr"][0]["match"] == {"op": "!=", "left": {"meta": {"key": "iifgroup"}}, "right": VM_PORT_GROUP}
    # No uplink: no egress sets, and VMs reach nothing but the host.
    assert "egress_blocked" not in sets(objects)


def test_egress_lists_are_collapsed_and_deny_is_checked_before_allow() -> None:
    objects = render_ruleset(plan(uplink="eth0", egress_allow=(IPv4Network("10.1.0.0/16"), IPv4Network("10.1.1.0/24")),
                                  egress_deny=(IPv4Network("8.8.8.8/32"),)))
    found = sets(objects)
    assert found["egress_allow"]["elem"] == [{"prefix": {"addr": "10.1.0.0", "len": 16}}]
    assert {"prefix": {"addr": "169.254.0.0", "len": 16}} in found["egress_blocked"]["elem"]
    forward = comments(objects, "inet")
    assert forward.index("browservm: egress denylist") < forward.index("browservm: egress allowlist") \
        < next(i for i, c in enumerate(forward) if "not the public internet" in c)


def test_forwarding_is_confined_only_when_browservm_turned_it_on() -> None:
    assert not any("routes for its VMs only" in c for c in comments(render_ruleset(plan()), "inet"))
    confined = comments(render_ruleset(plan(), confine_forwarding=True), "inet")
    assert any(c.endswith("for no one else") for c in confined)


def test_a_listing_without_the_vms_elements_compares_equal_and_the_elements_are_read_back() -> None:
    port = VmPort("fc-abc", "02:fc:00:00:00:01", IPv4Address("192.168.100.2"))
    listing: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6"}},
        {"set": {"family": "bridge", "name": "vm_mac", "table": "browservm", "handle": 3,
                 "elem": [{"concat": ["fc-abc", "02:fc:00:00:00:01"]}]}},
        {"set": {"family": "bridge", "name": "vm_ip4", "table": "browservm", "handle": 4,
                 "elem": [{"concat": ["fc-abc", "192.168.100.2"]}]}},
    ]
    assert normalise_listing(listing) == [
        {"set": {"family": "bridge", "name": "vm_mac", "table": "browservm"}},
        {"set": {"family": "bridge", "name": "vm_ip4", "table": "browservm"}}]
    assert listed_ports(listing) == {"fc-abc": ("02:fc:00:00:00:01", "192.168.100.2")}
    assert [e["element"]["name"] for e in vm_elements([port])] == ["vm_mac", "vm_ip4"]
    assert vm_elements([]) == []


@pytest.mark.parametrize("field", ["egress_allow", "egress_deny"])
def test_egress_settings_are_validated_and_named(field: str) -> None:
    assert getattr(load_settings(**{field: "10.1.0.0/16, 192.0.2.0/24"}), field) == (
        IPv4Network("10.1.0.0/16"), IPv4Network("192.0.2.0/24"))
    for bad in ("10.1.0.1/16", "nonsense", "2001:db8::/32"):
        with pytest.raises(InvalidInput) as refused:
            load_settings(**{field: bad})
        assert refused.value.field.startswith(field)
    assert load_settings(adopt_bridge=True).adopt_bridge is True
