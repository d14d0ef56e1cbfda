"""Network links of one namespace: bridges and TAP devices, through rtnetlink.

Open a `Links` inside `NetworkNamespace.entered()`: its netlink socket stays
in that namespace for its whole life. TAPs are made with the TUN ioctls (the
kernel has no netlink request for a persistent TAP), which also act in the
namespace of the calling thread.

Every link browservm creates carries an alias (IFLA_IFALIAS) that names its
owner, so a restarted controller can tell its own TAPs from anyone else's.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

from browservm.errors import HostNetworkError
from browservm.hostnet.rtnl import RtnlSocket

BRIDGE_ALIAS = "browservm bridge"
TAP_ALIAS_PREFIX = "browservm vm="  # then the VM id and " owner=" the tag of the state directory

_TUNSETIFF = 0x400454CA
_TUNSETPERSIST = 0x400454CB
_TUNSETOWNER = 0x400454CC
_MAIN_TABLE = 254  # RT_TABLE_MAIN
_TUNSETGROUP = 0x400454CE
# The flags Firecracker opens its TAP with: a TAP without packet info, with virtio-net headers.
_IFF_TAP, _IFF_NO_PI, _IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
_IFF_TUN_EXCL = 0x8000  # fail if the name exists instead of attaching to that device
_IFF_UP = 0x1


def tap_alias(vm_id: str, owner: str) -> str:
    """The alias of a VM's TAP: its VM, and which state directory (controller) created it."""
    return f"{TAP_ALIAS_PREFIX}{vm_id} owner={owner}"


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None
    up: bool
    master: int | None
    alias: str | None
    mac: str
    tap_owner: tuple[int, int] | None  # uid, gid of a TAP
    group: int = 0  # the interface group; VM ports are in firewall.VM_PORT_GROUP

    def vm_of(self, owner: str) -> str | None:
        """The VM id in the alias of a TAP that the controller tagged `owner` made, else None."""
        if self.alias is None or not self.alias.startswith(TAP_ALIAS_PREFIX):
            return None
        vm_id, _, tag = self.alias[len(TAP_ALIAS_PREFIX):].partition(" owner=")
        return vm_id if tag == owner else None

    @property
    def half_made_tap(self) -> bool:
        """A TAP as a crash between `create_tap` and `attach_port` leaves it: no alias, no bridge.

        Only its name can then say whose it is, and only a caller that derived
        that name from a VM of its own store can claim it.
        """
        return self.kind == "tun" and self.alias is None and self.master is None


def _link_info(msg: Any) -> LinkInfo:
    kind = msg.get(("linkinfo", "kind"))
    owner = None
    if kind == "tun":
        data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
        if data is not None:
            owner = (data.get_attr("IFLA_TUN_OWNER"), data.get_attr("IFLA_TUN_GROUP"))
    return LinkInfo(
        index=msg["index"],
        name=msg.get("ifname"),
        kind=kind,
        up=bool(msg["flags"] & _IFF_UP),
        master=msg.get("master"),
        alias=msg.get("ifalias"),
        mac=msg.get("address"),
        tap_owner=owner,
        group=msg.get("group") or 0,
    )


class Links:
    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns  # for error messages only: the socket is opened in the current namespace
        self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    @contextmanager
    def _step(self, step: str, device: str | None) -> Iterator[None]:
        try:
            yield
        except NetlinkError as exc:
            raise HostNetworkError(step, os.strerror(exc.code), device=device, netns=self._netns) from exc
        except OSError as exc:
            raise HostNetworkError(step, exc.strerror or str(exc), device=device, netns=self._netns) from exc

    def get(self, name: str) -> LinkInfo | None:
        try:
            msgs = self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise HostNetworkError("look up link", os.strerror(exc.code), device=name, netns=self._netns) from exc
        return _link_info(msgs[0])

    def all(self) -> list[LinkInfo]:
        with self._step("list links", None):
            return [_link_info(msg) for msg in self._ipr.get_links()]

    def routes(self) -> list[tuple[IPv4Network, int | None]]:
        """The main table's IPv4 routes, but the default route: (destination, output link index)."""
        with self._step("list routes", None):
            msgs = self._ipr.get_routes(family=socket.AF_INET, table=_MAIN_TABLE)
        found = []
        for msg in msgs:
            if msg["dst_len"] == 0:
                continue
            destination = IPv4Network(f"{msg.get('RTA_DST')}/{msg['dst_len']}", strict=False)
            found.append((destination, msg.get("RTA_OIF")))
        return found

    def create_bridge(self, name: str, mac: str) -> LinkInfo:
        with self._step("create bridge", name):
            self._ipr.link("add", ifname=name, kind="bridge", address=mac)
        return self._require(name)

    def set_up(self, link: LinkInfo, alias: str | None = None) -> None:
        extra = {} if alias is None else {"ifalias": alias}
        with self._step("set link up", link.name):
            self._ipr.link("set", index=link.index, state="up", **extra)

    def addresses(self, link: LinkInfo) -> list[IPv4Interface]:
        with self._step("list addresses", link.name):
            msgs = self._ipr.get_addr(index=link.index, family=2)
        return [IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}") for m in msgs]

    def add_address(self, link: LinkInfo, address: IPv4Interface) -> None:
        with self._step(f"add address {address}", link.name):
            self._ipr.addr("add", index=link.index, address=str(address.ip), prefixlen=address.network.prefixlen)

    def remove_address(self, link: LinkInfo, address: IPv4Interface) -> None:
        with self._step(f"remove address {address}", link.name):
            self._ipr.addr("del", index=link.index, address=str(address.ip), prefixlen=address.network.prefixlen)

    def isolated_ports(self) -> set[int]:
        """Indexes of the bridge ports that are isolated from each other."""
        with self._step("list bridge ports", None):
            msgs = self._ipr.brport("dump")
        return {m["index"] for m in msgs if m.get_nested("IFLA_PROTINFO", "IFLA_BRPORT_ISOLATED")}

    def delete(self, index: int, name: str) -> None:
        try:
            self._ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code != errno.ENODEV:  # already gone is what we wanted
                raise HostNetworkError("delete link", os.strerror(exc.code),
                                       device=name, netns=self._netns) from exc

    def _require(self, name: str) -> LinkInfo:
        link = self.get(name)
        if link is None:
            raise HostNetworkError("look up link", "was created but is not there", device=name, netns=self._netns)
        return link


def create_tap(name: str, uid: int, gid: int, netns: str | None) -> int:
    """A persistent TAP owned by uid:gid, so an unprivileged VMM can open it; returns its index.

    Acts in the namespace of the calling thread. Here and in `attach_port`, the
    per-VM path avoids pyroute2 (see rtnl.py).
    """
    request = struct.pack("16sH22x", name.encode("ascii"), _IFF_TAP | _IFF_NO_PI | _IFF_VNET_HDR | _IFF_TUN_EXCL)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, _TUNSETIFF, request)
            fcntl.ioctl(fd, _TUNSETOWNER, uid)
            fcntl.ioctl(fd, _TUNSETGROUP, gid)
            fcntl.ioctl(fd, _TUNSETPERSIST, 1)
        finally:
            os.close(fd)  # before TUNSETPERSIST succeeded, closing removes the device
        return socket.if_nametoindex(name)
    except OSError as exc:
        reason = "a link with this name already exists" if exc.errno == errno.EBUSY else exc.strerror or str(exc)
        raise HostNetworkError("create TAP", reason, device=name, netns=netns) from None


def attach_port(rtnl: RtnlSocket, index: int, name: str, bridge: str, alias: str, *, netns: str | None,
                group: int = 0, mac: str | None = None, address: IPv4Address | None = None) -> None:
    """Make link `index` an up, isolated port of `bridge`: isolated ports cannot talk to each other.

    A VM port also gets its group, and its VM's `mac` and `address` pinned (see rtnl.py).
    """
    try:
        bridge_index = socket.if_nametoindex(bridge)
    except OSError:
        raise HostNetworkError(f"attach to {bridge}", f"bridge {bridge} does not exist; run `browservm host up`",
                               device=name, netns=netns) from None
    try:
        rtnl.make_isolated_port(index, bridge_index, alias, group=group,
                                mac=None if mac is None else bytes.fromhex(mac.replace(":", "")),
                                address=None if address is None else address.packed)
    except OSError as exc:
        raise HostNetworkError(f"attach to {bridge}", exc.strerror or str(exc), device=name, netns=netns) from exc
