"""A minimal rtnetlink client for the one request on every VM's start-up path.

pyroute2 serves everything else, but it spends about 0.3 ms of Python on each
request; making a TAP an up, isolated, labelled bridge port takes two
requests, and the whole per-VM network setup has a 0.5 ms budget (bench/).
So these two messages are encoded here by hand and sent in one write, and the
kernel's acknowledgements are read back. Measured: 0.12 ms instead of 0.8 ms.
"""

from __future__ import annotations

import os
import socket
import struct

_RTM_NEWLINK = 16
_RTM_DELLINK = 17
_RTM_SETLINK = 19
_NLMSG_ERROR = 2
_NLM_F_REQUEST = 0x1
_NLM_F_ACK = 0x4
_NLA_F_NESTED = 0x8000
_AF_UNSPEC, _AF_BRIDGE = 0, 7
_IFF_UP = 0x1
_IFLA_MASTER = 10
_IFLA_PROTINFO = 12
_IFLA_IFALIAS = 20
_IFLA_BRPORT_ISOLATED = 33
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change


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

    def _message(self, kind: int, family: int, index: int, attrs: bytes, *, up: bool = False) -> bytes:
        self._sequence += 1
        flags = _IFF_UP if up else 0
        body = _IFINFO.pack(family, 0, index, flags, flags) + attrs
        return _HEADER.pack(_HEADER.size + len(body), kind, _NLM_F_REQUEST | _NLM_F_ACK, self._sequence, 0) + body

    def make_isolated_port(self, index: int, master: int, alias: str) -> None:
        """Link `index` becomes an up, isolated port of bridge `master`, labelled `alias`.

        The kernel applies bridge-port options only to an existing port, so the
        second message must follow the first; both go in one write.
        """
        join = self._message(_RTM_NEWLINK, _AF_UNSPEC, index,
                             _attr(_IFLA_MASTER, struct.pack("=I", master))
                             + _attr(_IFLA_IFALIAS, alias.encode() + b"\0"), up=True)
        isolate = self._message(_RTM_SETLINK, _AF_BRIDGE, index,
                                _attr(_IFLA_PROTINFO | _NLA_F_NESTED, _attr(_IFLA_BRPORT_ISOLATED, b"\x01")))
        self._send_and_wait(join + isolate, {self._sequence - 1, self._sequence})

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
