"""The comparison of what browservm set with what is there (hostnet/expected.py), on hand-made snapshots."""

from __future__ import annotations

import copy
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from browservm.hostnet.expected import (
    FIREWALL,
    Prop,
    compare,
    host_props,
    plan_expectation,
    port_props,
    ruleset_mismatches,
    vm_port,
)
from browservm.hostnet.firewall import VM_PORT_GROUP, render_ruleset
from browservm.hostnet.links import BRIDGE_ALIAS, LinkInfo, tap_alias
from browservm.hostnet.observed import FdbEntry, Neighbour, Snapshot
from browservm.netplan import NetworkPlan

PLAN = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
SEGMENT = PLAN.segments[0]
TAP, MAC, ADDRESS = "fc-abc", "02:fc:00:00:00:02", IPv4Address("192.168.100.2")
SPEC = vm_port("vm-a", TAP, "br0", MAC, ADDRESS, controller="0wner000", tap_owner=(1000, 1000))


def _link(index: int, name: str, kind: str | None, **extra: object) -> LinkInfo:
    fields: dict[str, object] = {"up": True, "master": None, "alias": None, "mac": "02:00:00:00:00:00",
                                 "tap_owner": None, "group": 0} | extra
    return LinkInfo(index=index, name=name, kind=kind, **fields)  # type: ignore[arg-type]


def healthy() -> Snapshot:
    """The namespace right after `host up` (in a namespace of its own) and one `add_tap`."""
    ruleset = render_ruleset(PLAN)
    for obj in ruleset:  # the VM's elements, where nft lists them: in its sets
        body = obj.get("set", {})
        if body.get("family") == "bridge" and body.get("name") in ("vm_mac", "vm_ip4"):
            body["elem"] = [{"concat": [TAP, MAC if body["name"] == "vm_mac" else str(ADDRESS)]}]
    return Snapshot(
        netns_exists=True,
        links={"lo": _link(1, "lo", None),
               "br0": _link(2, "br0", "bridge", mac=SEGMENT.bridge_mac, alias=BRIDGE_ALIAS),
               TAP: _link(3, TAP, "tun", master=2, alias=tap_alias("vm-a", "0wner000"), tap_owner=(1000, 1000),
                          group=VM_PORT_GROUP)},
        addresses={2: [IPv4Interface("192.168.100.1/24")]},
        port_options={3: {"isolated": 1, "learning": 0, "hairpin": 0}},
        fdb=[FdbEntry(MAC, 3, static=True, sticky=True)],
        neighbours=[Neighbour(str(ADDRESS), MAC, 2, "permanent")],
        sysctls={"net.ipv4.ip_forward": "1"},
        rules={family: [{"priority": 100, "src": "all", "iif": "br0", "fwmark": "0", "fwmask": "0x100000",
                         "action": "prohibit"},
                        {"priority": 1000, "src": "all", "table": "local"},
                        {"priority": 32766, "src": "all", "table": "main"}] for family in ("ipv4", "ipv6")},
        ruleset=ruleset)


def host() -> list[Prop]:
    return host_props(PLAN, netns="ns", own_netns=True, made_bridges={"br0"})


def texts(snapshot: Snapshot) -> list[str]:
    return [f"{m.prop.piece}: {m.text}" for m in compare(host() + port_props(SPEC, netns="ns"), snapshot)]


def test_what_was_set_compares_clean() -> None:
    assert texts(healthy()) == []


def test_each_changed_property_is_named_with_expected_and_found() -> None:
    cases: dict[str, tuple[Callable[[Snapshot], object], str]] = {
        "learning": (lambda s: s.port_options[3].update(learning=1),
                     f"tap {TAP}: bridge-port learning: expected off, found on"),
        "group": (lambda s: s.links.update({TAP: _link(3, TAP, "tun", master=2, alias=SPEC.alias,
                                                       tap_owner=(1000, 1000), group=0)}),
                  f"tap {TAP}: interface group: expected {VM_PORT_GROUP:#x}, found 0x0"),
        "fdb learned": (lambda s: s.fdb.__setitem__(0, FdbEntry(MAC, 3, static=False, sticky=False)),
                        f"tap {TAP}: forwarding entry: expected {MAC} static sticky, found {MAC} learned"),
        "fdb on another port": (lambda s: s.fdb.__setitem__(0, FdbEntry(MAC, 2, static=True, sticky=True)),
                                f"tap {TAP}: forwarding entry: expected {MAC} static sticky, found {MAC} on br0 "
                                "static sticky"),
        "neighbour": (lambda s: s.neighbours.__setitem__(0, Neighbour(str(ADDRESS), MAC, 2, "stale")),
                      f"tap {TAP}: neighbour {ADDRESS} on br0: expected {MAC} permanent, found {MAC} stale"),
        "bridge mac": (lambda s: s.links.update({"br0": _link(2, "br0", "bridge", mac="02:00:00:00:00:09",
                                                              alias=BRIDGE_ALIAS)}),
                       f"bridge br0: MAC: expected {SEGMENT.bridge_mac}, found 02:00:00:00:00:09"),
        "forwarding": (lambda s: s.sysctls.update({"net.ipv4.ip_forward": "0"}),
                       "sysctl net.ipv4.ip_forward: value: expected 1, found 0"),
        "local first": (lambda s: s.rules["ipv4"].insert(0, {"priority": 0, "src": "all", "table": "local"}),
                        "routing rule local: ipv4 local table lookup: expected pref 1000, found pref 0, pref 1000"),
        "rule gone": (lambda s: s.rules["ipv6"].pop(0),
                      "routing rule br0: ipv6 pref 100: expected iif br0 fwmark 0x0/0x100000 prohibit, found absent"),
        "lo down": (lambda s: s.links.update({"lo": _link(1, "lo", None, up=False)}),
                    "netns ns: lo: expected up, found down"),
    }
    for name, (change, said) in cases.items():
        snapshot = healthy()
        change(snapshot)
        assert texts(snapshot) == [said], name


def test_a_missing_piece_is_named_once_and_a_detached_tap_is_told_from_a_wrong_bridge() -> None:
    snapshot = healthy()
    del snapshot.links[TAP]
    [missing] = compare(port_props(SPEC, netns=None), snapshot)
    assert (missing.cause, missing.text) == ("tap.missing", "exists: expected yes, found no")
    snapshot = healthy()
    snapshot.links[TAP] = _link(3, TAP, "tun", master=None, alias=SPEC.alias, tap_owner=(1000, 1000),
                                group=VM_PORT_GROUP)
    assert compare(port_props(SPEC, netns=None), snapshot)[0].cause == "tap.detached"
    snapshot.links[TAP] = _link(3, TAP, "tun", master=1, alias=SPEC.alias, tap_owner=(1000, 1000),
                                group=VM_PORT_GROUP)
    assert compare(port_props(SPEC, netns=None), snapshot)[0].cause == "tap.wrong_bridge"


def test_what_cannot_be_told_is_not_a_mismatch() -> None:
    snapshot = healthy()
    snapshot.ruleset = None  # nft could not list it
    snapshot.rules = {}
    snapshot.links[TAP] = _link(3, TAP, "veth", master=2, alias=SPEC.alias, group=VM_PORT_GROUP)  # no TAP owner
    assert texts(snapshot) == []


def test_a_held_down_link_and_an_adopted_bridge_expect_less() -> None:
    snapshot = healthy()
    snapshot.links[TAP] = _link(3, TAP, "tun", master=2, alias=SPEC.alias, tap_owner=(1000, 1000),
                                group=VM_PORT_GROUP, up=False)
    assert [m.text for m in compare(port_props(SPEC, netns=None), snapshot)] == ["state: expected up, found down"]
    assert compare(port_props(SPEC, netns=None, held_down=True), snapshot) == []
    snapshot.links["br0"] = _link(2, "br0", "bridge", mac="52:54:00:12:34:56", alias="lan")
    adopted = host_props(PLAN, netns=None, own_netns=False, made_bridges=())
    assert compare(adopted, snapshot) == []
    assert {p.name for p in plan_expectation(PLAN, None).host} == {"value", "exists", "kind", "state",
                                                                   "gateway address", "ipv4 pref 100",
                                                                   "ipv6 pref 100"}


def test_every_property_says_what_breaks_and_how_to_put_it_back() -> None:
    for prop in host() + port_props(SPEC, netns="ns"):
        assert prop.breaks and prop.repair, prop


def test_the_rendered_ruleset_names_each_object_once() -> None:
    assert ruleset_mismatches(render_ruleset(PLAN), render_ruleset(PLAN)) == []
    labels = [m.prop.name for m in ruleset_mismatches(render_ruleset(PLAN), [])]
    assert len(labels) == len(set(labels)) and not any("#" in label for label in labels)
    assert all(m.found == "absent" and m.prop.piece == FIREWALL for m in ruleset_mismatches(render_ruleset(PLAN), []))


def test_ruleset_differences_are_named() -> None:
    installed = render_ruleset(PLAN)
    current = copy.deepcopy(installed)
    chain = next(o["chain"] for o in current if "chain" in o and o["chain"]["name"] == "input")
    chain["policy"] = "drop"
    rule = next(o for o in current if "rule" in o and o["rule"]["comment"] == "browservm: no VM-to-VM traffic")
    current.remove(rule)
    current.append({"rule": {"family": "inet", "table": "browservm", "chain": "input", "expr": [{"accept": None}]}})
    current.append({"table": {"family": "inet", "name": "someone"}})  # not ours: not compared
    said = {m.prop.name: (m.prop.value, m.found) for m in ruleset_mismatches(installed, current)}
    assert said == {
        "chain inet browservm input": ("type filter hook input priority 0 policy accept",
                                       "type filter hook input priority 0 policy drop"),
        "rule inet browservm forward 'browservm: no VM-to-VM traffic'": ("iifname br0 oifname br0 drop", "absent"),
        "rule inet browservm input 'accept'": ("absent", "accept"),
    }


def test_reordered_rules_are_named() -> None:
    installed = render_ruleset(PLAN)
    rules = [i for i, o in enumerate(installed) if "rule" in o and o["rule"]["chain"] == "vm_ip4"]
    current = list(installed)
    current[rules[0]], current[rules[1]] = current[rules[1]], current[rules[0]]
    [mismatch] = ruleset_mismatches(installed, current)
    assert mismatch.prop.name.startswith("rule order at rule bridge browservm vm_ip4")


def test_a_difference_the_words_do_not_show_is_shown_exactly() -> None:
    installed = render_ruleset(PLAN)
    current = copy.deepcopy(installed)
    mark = next(o["rule"] for o in current if "rule" in o and o["rule"]["chain"] == "from_vm"
                and "checked" in o["rule"]["comment"])
    mark["expr"][0]["mangle"]["value"]["|"][1] = 1
    [mismatch] = ruleset_mismatches(installed, current)
    assert '"mangle"' in mismatch.prop.value and '"mangle"' in mismatch.found and mismatch.prop.value != mismatch.found
