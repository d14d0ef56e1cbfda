"""The policy-routing rule that keeps VMs from being routed when our nftables tables are gone.

`iif <bridge> fwmark 0/MARK_VM_CHECKED prohibit`: a packet from a VM bridge is
routed only if our inet prerouting chain marked it as checked. Routing rules
are not nftables state, so `nft flush ruleset` (Debian's nftables service does
it on every reload) leaves this rule in place, and until the tables are back
nothing a VM sends is forwarded anywhere: the uplink, the metadata address,
other networks. Set up by `host up`, not per VM: `ip` subprocesses are fine.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from browservm.errors import HostNetworkError
from browservm.hostnet.firewall import MARK_VM_CHECKED

RULE_PREF_BASE = 100  # before the main table (32766) and what usually sits in between
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

    def _listing(self) -> list[dict[str, Any]]:
        rules: list[dict[str, Any]] = json.loads(self._ip("list routing rules", "-j", "-4", "rule", "show") or "[]")
        return rules

    def present(self, bridge: str, pref: int) -> bool:
        for rule in self._listing():
            if (rule.get("priority") == pref and rule.get("iif") == bridge and rule.get("action") == "prohibit"
                    and int(str(rule.get("fwmark", "0")), 0) == 0
                    and int(str(rule.get("fwmask", "0")), 0) == MARK_VM_CHECKED):
                return True
        return False

    def _spec(self, bridge: str, pref: int) -> list[str]:
        return ["pref", str(pref), "iif", bridge, "fwmark", f"0/{MARK_VM_CHECKED:#x}", "prohibit"]

    def add(self, bridge: str, pref: int) -> None:
        self._ip(f"add routing rule for {bridge}", "-4", "rule", "add", *self._spec(bridge, pref))

    def delete(self, bridge: str, pref: int) -> bool:
        if not self.present(bridge, pref):
            return False
        self._ip(f"delete routing rule for {bridge}", "-4", "rule", "del", *self._spec(bridge, pref))
        return True
