"""A template's egress policy: where its VMs may go through the uplink (issue 21).

The host's policy (settings egress_allow/egress_deny, nftables rules on the bridge) is that of every
VM whose template names none: the public internet, plus the host's allowlist, minus its denylist.
A template may name its own, which replaces the host's allowlist for its VMs:

    [templates.kiosk]
    egress = "none"                       # or "internet" (the default): the public internet
    egress_allow = ["10.20.0.0/16"]       # reachable even if private or egress = "none"
    egress_deny = ["203.0.113.0/24"]      # never reachable; wins over egress_allow

The host's denylist still wins over everything: it is the operator's rail for the whole host. A VM
keeps the policy it was created with (its lease holds it) until it is destroyed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from ipaddress import IPv4Network, collapse_addresses

from browservm.errors import InvalidInput

MODES = ("internet", "none")
FIELDS = ("egress", "egress_allow", "egress_deny")
MAX_NETWORKS = 64  # per list: each is a set element on the VM's port, added at every start


@dataclass(frozen=True)
class EgressPolicy:
    internet: bool = True
    allow: tuple[IPv4Network, ...] = ()
    deny: tuple[IPv4Network, ...] = ()

    def __post_init__(self) -> None:
        # One form for one policy: the set elements, the lease's record and a comparison agree.
        object.__setattr__(self, "allow", tuple(collapse_addresses(self.allow)))
        object.__setattr__(self, "deny", tuple(collapse_addresses(self.deny)))

    @classmethod
    def from_fields(cls, fields: dict[str, object]) -> EgressPolicy | None:
        """The policy of a template's fields (`egress`, `egress_allow`, `egress_deny`); None when it names
        none (its VMs have the host's). InvalidInput naming the field."""
        if not any(name in fields for name in FIELDS):
            return None
        mode = fields.get("egress", "internet")
        if mode not in MODES:
            raise InvalidInput("egress", mode, f"must be one of {', '.join(MODES)}")
        return cls(internet=mode == "internet", allow=_networks("egress_allow", fields.get("egress_allow", [])),
                   deny=_networks("egress_deny", fields.get("egress_deny", [])))

    def describe(self) -> dict[str, object]:
        return {"egress": "internet" if self.internet else "none", "egress_allow": [str(n) for n in self.allow],
                "egress_deny": [str(n) for n in self.deny]}

    def to_json(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EgressPolicy:
        policy = cls.from_fields(json.loads(text))
        assert policy is not None  # describe() always names `egress`
        return policy


def _networks(field: str, value: object) -> tuple[IPv4Network, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput(field, value, "must be a list of IPv4 networks in CIDR notation, e.g. [\"10.1.0.0/16\"]")
    if len(value) > MAX_NETWORKS:
        raise InvalidInput(field, len(value), f"at most {MAX_NETWORKS} networks")
    networks = []
    for item in value:
        try:
            networks.append(IPv4Network(item))
        except ValueError as exc:
            raise InvalidInput(field, item, f"not an IPv4 network in CIDR notation: {exc}") from None
    return tuple(networks)
