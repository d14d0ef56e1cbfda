"""The address plan: which bridges exist and which addresses VMs may get.

A Linux bridge holds at most 1,024 ports (BR_MAX_PORTS), so a subnet larger
than a /22 is split into /22 segments, one bridge each, every segment with its
own gateway (its first address) on its bridge. A /24 is one segment on `br0`;
a /20 is four, on `br0`, `br0-1`, `br0-2`, `br0-3`. A VM's netmask and gateway
are those of its segment. Pure values, no I/O.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from browservm.errors import InvalidInput
from browservm.ids import IFNAMSIZ

SEGMENT_PREFIX = 22  # 1,021 VMs + the gateway: within a bridge's 1,024 ports


@dataclass(frozen=True)
class Segment:
    index: int
    bridge: str
    network: IPv4Network

    @functools.cached_property
    def gateway(self) -> IPv4Interface:
        return IPv4Interface((int(self.network.network_address) + 1, self.network.prefixlen))

    @property
    def first_vm(self) -> int:
        return int(self.network.network_address) + 2

    @property
    def last_vm(self) -> int:
        return int(self.network.broadcast_address) - 1

    @property
    def capacity(self) -> int:
        return self.last_vm - self.first_vm + 1

    @property
    def bridge_mac(self) -> str:
        # Fixed, so the bridge's MAC does not follow its lowest-numbered port
        # and change under the guests' ARP caches as TAPs come and go.
        digest = hashlib.sha256(b"bridge\0" + self.bridge.encode()).digest()[:4]
        return "02:fd:" + ":".join(f"{b:02x}" for b in digest)


@dataclass(frozen=True)
class NetworkPlan:
    subnet: IPv4Network
    segments: tuple[Segment, ...]
    uplink: str | None
    guest_ports: tuple[int, ...]
    # Egress through the uplink beyond the public internet (allow), or less of it (deny; wins over allow).
    egress_allow: tuple[IPv4Network, ...] = ()
    egress_deny: tuple[IPv4Network, ...] = ()

    @classmethod
    def build(cls, subnet: IPv4Network, bridge: str, uplink: str | None = None,
              guest_ports: tuple[int, ...] = (), *, egress_allow: tuple[IPv4Network, ...] = (),
              egress_deny: tuple[IPv4Network, ...] = ()) -> NetworkPlan:
        if subnet.prefixlen > 30:
            raise InvalidInput("subnet", str(subnet), "must leave room for a gateway and a VM (/30 or larger)")
        fits_one_bridge = subnet.prefixlen >= SEGMENT_PREFIX
        networks = [subnet] if fits_one_bridge else list(subnet.subnets(new_prefix=SEGMENT_PREFIX))
        names = [bridge] + [f"{bridge}-{i}" for i in range(1, len(networks))]
        longest = max(names, key=len)
        if len(longest) >= IFNAMSIZ:
            raise InvalidInput("bridge", bridge,
                               f"{subnet} needs {len(networks)} bridges and {longest!r} is over 15 characters")
        if uplink is not None and uplink in names:
            raise InvalidInput("uplink", uplink, "must not be one of the VM bridges")
        segments = tuple(Segment(i, name, net) for i, (name, net) in enumerate(zip(names, networks, strict=True)))
        for field, networks_given in (("egress_allow", egress_allow), ("egress_deny", egress_deny)):
            for network in networks_given:
                if not isinstance(network, IPv4Network):
                    raise InvalidInput(field, network, "must be IPv4 networks in CIDR notation, e.g. 10.1.0.0/16")
        return cls(subnet=subnet, segments=segments, uplink=uplink, guest_ports=guest_ports,
                   egress_allow=tuple(egress_allow), egress_deny=tuple(egress_deny))

    @property
    def bridges(self) -> tuple[str, ...]:
        return tuple(s.bridge for s in self.segments)

    @property
    def capacity(self) -> int:
        return sum(s.capacity for s in self.segments)

    def segment_of(self, address: IPv4Address) -> Segment | None:
        if address not in self.subnet:
            return None
        size = self.segments[0].network.num_addresses
        return self.segments[(int(address) - int(self.subnet.network_address)) // size]

    def is_vm_address(self, address: int) -> bool:
        segment = self.segment_of(IPv4Address(address))
        return segment is not None and segment.first_vm <= address <= segment.last_vm
