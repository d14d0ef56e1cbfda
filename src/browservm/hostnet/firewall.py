"""browservm's own nftables table: NAT to the uplink and isolation of the VMs.

`render_ruleset` is a pure function from the network plan to nft JSON objects;
`Nftables` only applies and lists them with `nft -j`. The table is replaced in
one nft transaction, so there is never a moment with half a ruleset.

What the table enforces (family inet, table "browservm"):
  input       VMs reach the host only for replies and the configured guest ports
  forward     no VM-to-VM traffic (routed, or bridged when br_netfilter sees it);
              VMs reach only the uplink; only replies reach VMs
  postrouting VM traffic leaving through the uplink is masqueraded
Bridge ports are also isolated (see links.py), which stops VM-to-VM frames at
layer 2 even if this table is flushed by another tool.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import Any

from browservm.errors import HostNetworkError
from browservm.netplan import NetworkPlan

FAMILY = "inet"
TABLE = "browservm"
_NFT_TIMEOUT_S = 30

NftObject = dict[str, Any]


def _match(left: NftObject, right: object, op: str = "==") -> NftObject:
    return {"match": {"op": op, "left": left, "right": right}}


def _one_or_set(values: list[Any]) -> object:
    return values[0] if len(values) == 1 else {"set": values}


def _meta(key: str) -> NftObject:
    return {"meta": {"key": key}}


def _rule(chain: str, comment: str, *expr: NftObject) -> NftObject:
    return {"rule": {"family": FAMILY, "table": TABLE, "chain": chain, "comment": comment, "expr": list(expr)}}


def _chain(name: str, kind: str, hook: str, prio: int) -> NftObject:
    return {"chain": {"family": FAMILY, "table": TABLE, "name": name, "type": kind,
                      "hook": hook, "prio": prio, "policy": "accept"}}


def render_ruleset(plan: NetworkPlan) -> list[NftObject]:
    bridges = _one_or_set(list(plan.bridges))
    from_vms = _match(_meta("iifname"), bridges)
    to_vms = _match(_meta("oifname"), bridges)
    replies = _match({"ct": {"key": "state"}}, ["established", "related"], op="in")
    counter: NftObject = {"counter": None}
    accept: NftObject = {"accept": None}
    drop: NftObject = {"drop": None}

    objects: list[NftObject] = [
        {"table": {"family": FAMILY, "name": TABLE}},
        _chain("input", "filter", "input", 0),
        _chain("forward", "filter", "forward", 0),
        _chain("postrouting", "nat", "postrouting", 100),
        _rule("input", "browservm: replies to connections the host opened", from_vms, replies, accept),
    ]
    if plan.guest_ports:
        gateways = _one_or_set([str(s.gateway.ip) for s in plan.segments])
        ports = _one_or_set(list(plan.guest_ports))
        objects.append(_rule(
            "input", "browservm: the controller's guest-facing ports", from_vms,
            _match({"payload": {"protocol": "ip", "field": "daddr"}}, gateways),
            _match({"payload": {"protocol": "tcp", "field": "dport"}}, ports), accept))
    objects += [
        _rule("input", "browservm: VMs may not reach the host's services", from_vms, counter, drop),
        _rule("forward", "browservm: no VM-to-VM traffic", from_vms, to_vms, counter, drop),
    ]
    if plan.uplink is not None:
        uplink = plan.uplink
        objects.append(_rule("forward", "browservm: VMs reach the outside through the uplink",
                             from_vms, _match(_meta("oifname"), uplink), accept))
    objects += [
        _rule("forward", "browservm: replies to VMs", to_vms, replies, accept),
        _rule("forward", "browservm: VMs reach nothing but the uplink", from_vms, counter, drop),
        _rule("forward", "browservm: nothing else opens connections to VMs", to_vms, counter, drop),
    ]
    if plan.uplink is not None:
        subnet = {"prefix": {"addr": str(plan.subnet.network_address), "len": plan.subnet.prefixlen}}
        objects.append(_rule("postrouting", "browservm: masquerade VM traffic to the uplink",
                             _match({"payload": {"protocol": "ip", "field": "saddr"}}, subnet),
                             _match(_meta("oifname"), plan.uplink), {"masquerade": None}))
    return objects


def ruleset_digest(objects: list[NftObject]) -> str:
    return hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()[:16]


def normalise_listing(listing: list[NftObject]) -> list[NftObject]:
    """A listing without what changes on its own: handles, counter values, nft's version."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            if "counter" in value and len(value) == 1:
                return {"counter": None}
            return {k: clean(v) for k, v in value.items() if k != "handle"}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value
    return [clean(obj) for obj in listing if "metainfo" not in obj]


class Nftables:
    """Runs `nft -j` in the namespace of the calling thread."""

    def __init__(self, netns: str | None = None, nft: str = "nft") -> None:
        self._netns = netns  # for error messages only
        self._nft = nft

    def _run(self, step: str, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([self._nft, "-j", *args], input=stdin, capture_output=True,
                                  text=True, timeout=_NFT_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise HostNetworkError(step, f"{self._nft!r} is not installed (apt-get install nftables)",
                                   netns=self._netns) from None
        except subprocess.TimeoutExpired:
            raise HostNetworkError(step, f"nft did not finish within {_NFT_TIMEOUT_S} s", netns=self._netns) from None

    def replace_table(self, objects: list[NftObject]) -> None:
        """Install `objects` as the whole of our table, atomically."""
        table = {"table": {"family": FAMILY, "name": TABLE}}
        commands = [{"add": table}, {"delete": table}] + [{"add": obj} for obj in objects]
        proc = self._run("install nftables table", ["-f", "-"], json.dumps({"nftables": commands}))
        if proc.returncode != 0:
            raise HostNetworkError("install nftables table", proc.stderr.strip() or f"nft exited {proc.returncode}",
                                   netns=self._netns)

    def list_table(self) -> list[NftObject] | None:
        """Our table as nft lists it, or None when it does not exist."""
        proc = self._run("list nftables table", ["list", "table", FAMILY, TABLE])
        if proc.returncode != 0:
            if "No such file or directory" in proc.stderr:
                return None
            raise HostNetworkError("list nftables table", proc.stderr.strip(), netns=self._netns)
        try:
            listing: list[NftObject] = json.loads(proc.stdout)["nftables"]
        except (ValueError, KeyError) as exc:
            raise HostNetworkError("list nftables table", f"unreadable nft output: {exc}", netns=self._netns) from exc
        return listing

    def delete_table(self) -> bool:
        """Delete our table; False if it was not there."""
        if self.list_table() is None:
            return False
        table = {"table": {"family": FAMILY, "name": TABLE}}
        proc = self._run("delete nftables table", ["-f", "-"], json.dumps({"nftables": [{"delete": table}]}))
        if proc.returncode != 0:
            raise HostNetworkError("delete nftables table", proc.stderr.strip(), netns=self._netns)
        return True
