"""The doctor's pure parts (what a VMM uses, foreign firewall rules, the report's JSON) and its two
API routes in-process (auth, 404, the JSON shape)."""

from __future__ import annotations

import asyncio
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import httpx

from browservm.doctor.causes import FIXES
from browservm.doctor.hostview import foreign_drop_policies, foreign_drops
from browservm.doctor.props import held_down
from browservm.doctor.report import FAIL, OK, Finding, HopResult, Report, render_text
from browservm.doctor.vmmview import firecracker_view, qemu_view
from browservm.hostnet.expected import host_props, port_props, vm_port
from browservm.netplan import NetworkPlan
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmm.firecracker import firecracker_config
from browservm.vmm.qemu import qemu_argv
from browservm.vmm.spec import VmSpec

from .test_api import AUTH, serve_fakes

SPEC = VmSpec("vm-0123456789ab", 1, 512, Path("/k/vmlinux"), Path("/i/rootfs.ext4"), Path("/d/overlay.ext4"),
              "console=ttyS0 ip=192.168.100.5::192.168.100.1:255.255.255.0:vm-0123456789ab:eth0:off",
              "fc-abcdefghijkl", "02:fc:01:02:03:04", Path("/d"), Path("/d/config.img"))


def test_what_qemu_and_firecracker_use_is_read_back_from_their_own_argv_and_config() -> None:
    for view in (qemu_view(qemu_argv(SPEC, "tcg"), "argv"), firecracker_view(firecracker_config(SPEC), "config")):
        assert (view.tap, view.iface_id, view.mac) == (SPEC.tap, SPEC.tap, SPEC.mac)
        assert view.boot_args == SPEC.boot_args
        assert (view.kernel, view.rootfs) == (str(SPEC.kernel), str(SPEC.rootfs))


def test_foreign_rules_that_drop_the_desktop_port_the_subnet_or_a_bridge_are_found_ours_are_not() -> None:
    def rule(table: str, *expr: object, family: str = "inet") -> dict[str, Any]:
        return {"rule": {"family": family, "table": table, "chain": "input", "expr": list(expr)}}

    sport = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "sport"}}, "right": 6080}}
    subnet = {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": "192.168.0.0", "len": 16}}}}
    other = {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 22}}
    ruleset: list[dict[str, Any]] = [
        rule("intruder", sport, {"drop": None}), rule("intruder", subnet, {"counter": None}, {"drop": None}),
               rule("intruder", other, {"drop": None}), rule("browservm", sport, {"drop": None}),
               rule("intruder", sport, {"accept": None}),
               {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", "hook": "forward", "prio": 0,
                          "policy": "drop"}}]
    found = foreign_drops(ruleset, IPv4Network("192.168.100.0/24"), ("br0",), 6080)
    assert found == ["table inet intruder chain input: tcp sport 6080 drop",
                     "table inet intruder chain input: ip saddr 192.168.0.0/16 drop"]
    assert foreign_drop_policies(ruleset) == ["table ip filter chain FORWARD: hook forward priority 0; policy drop"]


def test_the_report_names_the_first_failure_with_its_fix_and_every_step_with_its_time() -> None:
    passed = HopResult("vmm.spawn", checked=["VMM alive"], seconds=0.001)
    failed = HopResult("net.tap", checked=["TAP exists"], seconds=0.002)
    failed.found(Finding("tap.down", "the TAP is down", ["fc-x: no IFF_UP"]))
    failed.found(Finding("tap.not_isolated", "not isolated", fatal=False))  # graver one already there: evidence
    report = Report("vm", "vm-1", [passed, failed, HopResult("net.arp", status="skipped")], 0.01)
    document = report.to_json()
    assert (document["verdict"], document["hop"], document["cause"]) == ("FAIL", "net.tap", "tap.down")
    assert document["summary"] == "FAIL net.tap: the TAP is down"
    assert document["evidence"][0] == "fc-x: no IFF_UP" and document["fix"] == FIXES["tap.down"]
    assert [h["status"] for h in document["hops"]] == [OK, FAIL, "skipped"]
    assert set(document["hops"][0]) == {"hop", "status", "checked", "cause", "summary", "evidence", "fix", "seconds"}
    assert render_text(report).splitlines()[0] == "FAIL net.tap: the TAP is down"


def test_every_cause_code_is_a_dotted_identifier_with_a_fix() -> None:
    for code, fix in FIXES.items():
        assert code.count(".") == 1 and code == code.lower() and " " not in code and fix, code


def test_the_routes_need_the_key_answer_404_for_an_unknown_vm_and_give_the_report(tmp_path: Path) -> None:
    served = serve_fakes(tmp_path / "state")
    record = served.insert(VmState.BOOTING)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=served.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as anonymous:
            for path in ("/v1/doctor", f"/v1/vms/{record.vm_id}/diagnose"):
                response = await anonymous.get(path)
                assert response.status_code == 401 and response.json()["error"]["type"] == "Unauthorized"
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=AUTH) as client:
            assert (await client.get("/v1/vms/vm-0123456789ab/diagnose")).status_code == 404
            assert (await client.get("/v1/vms/NOT_AN_ID/diagnose")).status_code == 422
            host = (await client.get("/v1/doctor")).json()
            assert {"verdict", "hop", "cause", "summary", "evidence", "fix", "hops", "seconds"} <= set(host)
            vm = (await client.get(f"/v1/vms/{record.vm_id}/diagnose")).json()
            spawn = next(hop for hop in vm["hops"] if hop["hop"] == "vmm.spawn")
            assert (vm["vm_id"], vm["verdict"], spawn["cause"]) == (record.vm_id, "FAIL", "vm.not_started")

    asyncio.run(scenario())


def test_a_restored_firecracker_vms_tap_may_be_down_while_it_boots_and_every_cause_has_a_fix() -> None:
    def record(driver: str, started_from: str, state: VmState) -> VmRecord:
        return VmRecord(vm_id="vm-a", user="u", vcpus=1, mem_mib=256, directory="/d", driver=driver,
                        started_from=started_from, state=state)

    assert held_down(record("firecracker", "restored", VmState.BOOTING))
    assert held_down(record("firecracker", "pooled", VmState.BOOTING))
    assert not held_down(record("qemu", "restored", VmState.BOOTING))  # QEMU holds the link itself
    assert not held_down(record("firecracker", "cold", VmState.BOOTING))
    assert not held_down(record("firecracker", "restored", VmState.READY))
    plan = NetworkPlan.build(IPv4Network("192.168.100.0/24"), "br0")
    spec = vm_port("vm-a", "fc-a", "br0", "02:fc:00:00:00:02", plan.segments[0].gateway.ip + 1, controller="c",
                   tap_owner=(0, 0))
    props = host_props(plan, netns="ns", own_netns=True, made_bridges={"br0"}) + port_props(spec, netns="ns")
    for prop in props:
        assert FIXES.get(prop.cause) and (prop.cause_if_absent is None or FIXES.get(prop.cause_if_absent)), prop
