"""The policy-routing rule that keeps VMs from being routed when our nftables tables are gone.

`iif <bridge> fwmark 0/MARK_VM_CHECKED prohibit`: a packet from a VM bridge is
routed only if our inet prerouting chain marked it as checked. Routing rules
are not nftables state, so `nft flush ruleset` (Debian's nftables service does
it on every reload) leaves this rule in place, and until the tables are back
nothing a VM sends is forwarded anywhere: the uplink, the metadata address,
other networks. Set up by `host up`, not per VM: `ip` subprocesses are fine.

Local delivery (a VM to the host's own addresses) is decided by the `local`
table, which the kernel consults first (pref 0). In a namespace browservm
created for itself, `host up` moves that lookup after our rules
(LOCAL_PREF), so an unmarked packet from a VM reaches no host service either.
In a namespace it did not create (the host's own), the `local` rule is left
alone: there, until `check_and_restore` puts the tables back (seconds), a VM
could reach host services listening on the gateway address.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from browservm.errors import HostNetworkError
from browservm.hostnet.firewall import MARK_VM_CHECKED

RULE_PREF_BASE = 100  # before the main table (32766) and what usually sits in between
LOCAL_PREF = 1000  # where the local table's lookup goes in a namespace of our own: after our rules
FAMILIES = ("-4", "-6")
_TIMEOUT_S = 30


def rule_pref(segment_index: int) -> int:
    return RULE_PREF_BASE + segment_index


class PolicyRules:
    """Runs `ip rule` in the namespace of the calling thread."""

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns  # for error messages only

    def _ip(self, step: str, *args: str) -> str:
        try:
            proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise HostNetworkError(step, str(exc), netns=self._netns) from None
        if proc.returncode != 0:
            raise HostNetworkError(step, proc.stderr.strip() or f"ip exited {proc.returncode}", netns=self._netns)
        return proc.stdout

    def _listing(self, family: str = "-4") -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = json.loads(self._ip("list routing rules", "-j", family, "rule", "show") or "[]")
        return rules

    def present(self, bridge: str, pref: int) -> bool:
        return all(self._present(family, bridge, pref) for family in FAMILIES)

    def _present(self, family: str, bridge: str, pref: int) -> bool:
        for rule in self._listing(family):
            if (rule.get("priority") == pref and rule.get("iif") == bridge and rule.get("action") == "prohibit"
                    and int(str(rule.get("fwmark", "0")), 0) == 0
                    and int(str(rule.get("fwmask", "0")), 0) == MARK_VM_CHECKED):
                return True
        return False

    def _spec(self, bridge: str, pref: int) -> list[str]:
        return ["pref", str(pref), "iif", bridge, "fwmark", f"0/{MARK_VM_CHECKED:#x}", "prohibit"]

    def add(self, bridge: str, pref: int) -> None:
        for family in FAMILIES:
            if not self._present(family, bridge, pref):
                self._ip(f"add routing rule for {bridge}", family, "rule", "add", *self._spec(bridge, pref))

    def delete(self, bridge: str, pref: int) -> bool:
        found = False
        for family in FAMILIES:
            if self._present(family, bridge, pref):
                self._ip(f"delete routing rule for {bridge}", family, "rule", "del", *self._spec(bridge, pref))
                found = True
        return found

    def local_first(self) -> bool:
        """Whether the local table is still looked up before our rules (pref 0), in either family."""
        return any(rule.get("priority") == 0 and rule.get("table") == "local"
                   for family in FAMILIES for rule in self._listing(family))

    def move_local_after_ours(self) -> None:
        """Look the local table up at LOCAL_PREF instead of 0; added first, so it is never missing."""
        for family in FAMILIES:
            rules = self._listing(family)
            if not any(r.get("priority") == LOCAL_PREF and r.get("table") == "local" for r in rules):
                self._ip("move the local table's rule", family, "rule", "add", "pref", str(LOCAL_PREF),
                         "lookup", "local")
            if any(r.get("priority") == 0 and r.get("table") == "local" for r in rules):
                self._ip("move the local table's rule", family, "rule", "del", "pref", "0", "lookup", "local")
