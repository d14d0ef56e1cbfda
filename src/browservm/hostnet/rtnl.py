"""A minimal rtnetlink client for the one request on every VM's start-up path.

pyroute2 serves everything else, but it spends about 0.3 ms of Python on each
request; making a TAP an up, isolated, labelled bridge port takes four
requests, and the whole per-VM network setup has a small budget (bench/).
So these messages are encoded here by hand and sent in one write, and the
kernel's acknowledgements are read back. Measured: 0.12 ms instead of 0.8 ms
(for the first two).

Besides the nftables checks, a VM port gets protections that live outside
nftables and so survive another tool flushing the ruleset: it learns no
addresses (learning off) and its VM's MAC is a static, sticky FDB entry on it,
so no frame can move that MAC to another port; and the host's neighbour entry
for the VM's address is permanent, so no ARP can point it at another MAC.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_RTM_SETLINK = 19
_RTM_NEWNEIGH = 28
_RTM_DELNEIGH = 29
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLM_F_REPLACE = 0x100
_NLM_F_CREATE = 0x400
_NLA_F_NESTED = 0x8000
_AF_UNSPEC, _AF_INET, _AF_BRIDGE = 0, 2, 7
_IFF_UP = 0x1
_IFLA_MASTER = 10
_IFLA_PROTINFO = 12
_IFLA_IFALIAS = 20
_IFLA_GROUP = 27
_IFLA_BRPORT_LEARNING = 8
_IFLA_BRPORT_ISOLATED = 33
# A VM port's bridge-port options, named as `bridge -d link` and IFLA_BRPORT_* name them: what
# `make_isolated_port` sets, and what `host status` and the doctor expect (expected.py).
VM_PORT_OPTIONS: tuple[tuple[str, int, bool], ...] = (
    ("isolated", _IFLA_BRPORT_ISOLATED, True),  # no frames to or from another isolated port
    ("learning", _IFLA_BRPORT_LEARNING, False),  # only with the VM's MAC pinned (below)
)
_NDA_DST, _NDA_LLADDR = 1, 2
_NUD_NOARP, _NUD_PERMANENT = 0x40, 0x80
_NTF_MASTER, _NTF_STICKY = 0x04, 0x40
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_NDMSG = struct.Struct("=BxxxiHBB")  # ndmsg: family, index, state, flags, type


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


class RtnlSocket:
    """A NETLINK_ROUTE socket in the namespace of the thread that opens it."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        self._sock.bind((0, 0))
        self._sequence = 0

    def close(self) -> None:
        self._sock.close()

    def _envelope(self, kind: int, body: bytes, flags: int = 0) -> bytes:
        self._sequence += 1
        return _HEADER.pack(_HEADER.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK | flags,
                            self._sequence, 0) + body

    def _message(self, kind: int, family: int, index: int, attrs: bytes, *, up: bool = False) -> bytes:
        flags = _IFF_UP if up else 0
        return self._envelope(kind, _IFINFO.pack(family, 0, index, flags, flags) + attrs)

    def _neighbour(self, kind: int, family: int, index: int, state: int, *, flags: int, attrs: bytes) -> bytes:
        create = _NLM_F_CREATE | _NLM_F_REPLACE if kind == _RTM_NEWNEIGH else 0
        return self._envelope(kind, _NDMSG.pack(family, index, state, flags, 0) + attrs, create)

    def make_isolated_port(self, index: int, master: int, alias: str, *, group: int = 0,
                           mac: bytes | None = None, address: bytes | None = None) -> None:
        """Link `index` becomes an up, isolated port of bridge `master`, labelled `alias`, in `group`.

        With `mac`, the port learns nothing and `mac` is a static, sticky FDB entry on it;
        with `address` too, the bridge's neighbour entry for it is `mac`, permanently.
        The kernel applies bridge-port options only to an existing port, so the
        later messages must follow the first; all go in one write.
        """
        first = self._sequence + 1
        messages = self._message(_RTM_NEWLINK, _AF_UNSPEC, index,
                                 _attr(_IFLA_MASTER, struct.pack("=I", master))
                                 + _attr(_IFLA_IFALIAS, alias.encode() + b"\0")
                                 + _attr(_IFLA_GROUP, struct.pack("=I", group)), up=True)
        # Without a MAC to pin the port keeps learning: the bridge must learn where its frames come from.
        options = b"".join(_attr(kind, bytes([value])) for name, kind, value in VM_PORT_OPTIONS
                           if mac is not None or name != "learning")
        messages += self._message(_RTM_SETLINK, _AF_BRIDGE, index, _attr(_IFLA_PROTINFO | _NLA_F_NESTED, options))
        if mac is not None:
            messages += self._neighbour(_RTM_NEWNEIGH, _AF_BRIDGE, index, _NUD_NOARP, flags=_NTF_MASTER | _NTF_STICKY,
                                        attrs=_attr(_NDA_LLADDR, mac))
            if address is not None:
                messages += self._neighbour(_RTM_NEWNEIGH, _AF_INET, master, _NUD_PERMANENT, flags=0,
                                            attrs=_attr(_NDA_DST, address) + _attr(_NDA_LLADDR, mac))
        self._send_and_wait(messages, set(range(first, self._sequence + 1)))

    def forget_neighbour(self, bridge: int, address: bytes) -> None:
        """Remove the bridge's neighbour entry for `address`; one that is not there is no error."""
        try:
            message = self._neighbour(_RTM_DELNEIGH, _AF_INET, bridge, 0, flags=0, attrs=_attr(_NDA_DST, address))
            self._send_and_wait(message, {self._sequence})
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def set_up(self, index: int, up: bool) -> None:
        """Set link `index` administratively up or down (its IFF_UP flag only)."""
        message = self._envelope(_RTM_NEWLINK, _IFINFO.pack(_AF_UNSPEC, 0, index, _IFF_UP if up else 0, _IFF_UP))
        self._send_and_wait(message, {self._sequence})

    def delete_link(self, index: int) -> None:
        self._send_and_wait(self._message(_RTM_DELLINK, _AF_UNSPEC, index, b""), {self._sequence})

    def _send_and_wait(self, data: bytes, pending: set[int]) -> None:
        self._sock.sendall(data)
        first_error = 0
        while pending:
            reply = self._sock.recv(65536)
            offset = 0
            while offset + _HEADER.size <= len(reply):
                length, kind, _, sequence, _ = _HEADER.unpack_from(reply, offset)
                if kind == _NLMSG_ERROR and sequence in pending:
                    pending.discard(sequence)
                    (code,) = struct.unpack_from("=i", reply, offset + _HEADER.size)
                    first_error = first_error or -code
                offset += max(length, _HEADER.size) + (-length % 4)
        if first_error:
            raise OSError(first_error, os.strerror(first_error))
