"""Every property browservm set, against what is there: the host's pieces and one VM's port.

The description is the host network's own (hostnet/expected.py: what `host up` and `add_tap`
set, and how `host status` compares it), so the doctor and the code that sets up the network
cannot drift apart. Each property that differs becomes a finding under its hop, with the
property, the expected and the found value, what that breaks and the command that puts it back.
"""

from __future__ import annotations

from ipaddress import IPv4Address

from browservm.doctor.report import (
    HOST_BRIDGE,
    HOST_FIREWALL,
    HOST_FORWARDING,
    HOST_NETNS,
    Finding,
    HopResult,
)
from browservm.hostnet.expected import (
    FIREWALL,
    Expectation,
    Mismatch,
    Prop,
    compare,
    ruleset_mismatches,
)
from browservm.hostnet.observed import Snapshot
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState

# Which hop reports a host piece, by the start of its name (the pieces `host status` shows).
_HOPS = (("netns ", HOST_NETNS), ("sysctl ", HOST_FORWARDING), ("bridge ", HOST_BRIDGE),
         ("routing rule ", HOST_FIREWALL), (FIREWALL, HOST_FIREWALL))


def hop_of(piece: str) -> str:
    return next((hop for prefix, hop in _HOPS if piece.startswith(prefix)), HOST_NETNS)


def finding(mismatch: Mismatch) -> Finding:
    prop = mismatch.prop
    return Finding(mismatch.cause, f"{prop.piece}: {prop.name} is {mismatch.found}, browservm set "
                                   f"{prop.value}" + (f": {prop.breaks}" if prop.breaks else ""),
                   mismatch.evidence(), fatal=prop.fatal)


def _checked(props: tuple[Prop, ...] | list[Prop]) -> dict[str, list[str]]:
    """piece -> the names of its properties, in order."""
    names: dict[str, list[str]] = {}
    for prop in props:
        names.setdefault(prop.piece, []).append(prop.name)
    return names


def host_properties(expectation: Expectation, view: Snapshot, hops: dict[str, HopResult]) -> None:
    """The host's pieces as `host up` set them, each under its hop."""
    for piece, names in _checked(expectation.host).items():
        hops[hop_of(piece)].checked.append(f"{piece} as `host up` set it: {', '.join(names)}")
    for mismatch in compare(expectation.host, view):
        hops[hop_of(mismatch.prop.piece)].found(finding(mismatch))


def firewall_properties(expectation: Expectation, view: Snapshot, result: HopResult) -> bool:
    """browservm's tables against the listing `host up` installed; whether a difference was named."""
    if expectation.firewall is None or view.ruleset is None:
        return False
    mismatches = ruleset_mismatches(expectation.firewall, view.ruleset)
    result.checked.append("every table, chain, set and rule of browservm's as `host up` installed them")
    for mismatch in mismatches:
        result.found(finding(mismatch))
    return bool(mismatches)


def held_down(record: VmRecord) -> bool:
    """A restored VM whose VMM has no link control (Firecracker): its TAP is down on purpose until the
    guest took its identity (vm/manager.py `_restore`, `_link_up`)."""
    return record.driver == "firecracker" and record.started_from != "cold" and record.state == VmState.BOOTING


def port_properties(expectation: Expectation, record: VmRecord, address: str, view: Snapshot,
                    result: HopResult) -> None:
    """The VM's TAP as `add_tap` set it."""
    held = held_down(record)
    props = expectation.port(record.vm_id, record.tap, record.bridge, record.mac, IPv4Address(address),
                             held_down=held)
    result.checked.append(f"TAP {record.tap} as `vm create` set it: {', '.join(prop.name for prop in props)}"
                          + (" (its link is held down until the restored guest took its identity)" if held else ""))
    for mismatch in compare(props, view):
        result.found(finding(mismatch))
