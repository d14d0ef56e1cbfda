"""The kernel's word that another program changed our nftables tables or the routing rules.

The drift check (drift.py) puts our tables and rules back; run on a timer, a flush went unnoticed
until its next tick, and in the host's own namespace a VM could reach a host service on the gateway
address meanwhile (README, "The firewall stays in place"). Subscribed to nftables' notifications
(NFNLGRP_NFTABLES) and the IPv4 routing rules' (RTNLGRP_IPV4_RULE), the controller hears of every
change as it is committed. The kernel commits one nftables transaction at a time and sends its
messages, each naming its table, then a NEWGEN naming the thread that committed it. A transaction
wakes the check when it touched one of our tables and was committed by another process (an `nft`
process of ours included); the VMs' set elements, added by this process's own threads, and other
programs' tables (a firewall manager's ever-changing sets) wake nothing. Any routing-rule change does.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Collection

_NETLINK_NETFILTER = 12
_NFNLGRP_NFTABLES = 7
_RTMGRP_IPV4_RULE = 0x80  # RTNLGRP_IPV4_RULE (8) as a bind() mask
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_NFNL_SUBSYS_NFTABLES = 10
_NFT_MSG_NEWGEN = 15
_NFTA_GEN_PROC_PID = 2
# The table's name is attribute 1 of every nftables object's message: NFTA_TABLE_NAME, NFTA_CHAIN_TABLE,
# NFTA_RULE_TABLE, NFTA_SET_TABLE, NFTA_SET_ELEM_LIST_TABLE, NFTA_OBJ_TABLE, NFTA_FLOWTABLE_TABLE.
_NFTA_OF_TABLE = 1
_RTM_NEWRULE, _RTM_DELRULE = 32, 33
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGENMSG = 4  # family, version, resource id
_RECEIVE_BUFFER = 1 << 20  # a burst of notifications (a restored table with many VMs' elements) fits
NFPROTO = {"inet": 1, "ip": 2, "arp": 3, "netdev": 5, "bridge": 7, "ip6": 10}


def _own_thread(tid: int) -> bool:
    """Whether `tid` is one of this process's threads. The kernel names the committing thread by its
    id in the first pid namespace: in a container of our own it matches none, and every change then
    counts as another program's, which costs a check and never misses one."""
    return os.path.exists(f"/proc/self/task/{tid}")


class Transactions:
    """Follows the notifications, transaction by transaction, for changes to `tables` ((family, name))."""

    def __init__(self, tables: Collection[tuple[str, str]]) -> None:
        self._tables = {(NFPROTO[family], name.encode()) for family, name in tables}
        self._touched = False  # the transaction under way touched one of our tables

    def feed(self, datagram: bytes) -> bool:
        """Whether the messages in `datagram` complete another program's change to our tables, or
        change a routing rule."""
        changed = False
        offset = 0
        while offset + _HEADER.size <= len(datagram):
            length, kind, _, _, _ = _HEADER.unpack_from(datagram, offset)
            if length < _HEADER.size + _NFGENMSG or offset + length > len(datagram):
                return True  # cut short or malformed: look rather than guess
            body = datagram[offset + _HEADER.size:offset + length]
            if kind in (_RTM_NEWRULE, _RTM_DELRULE):
                changed = True
            elif kind >> 8 == _NFNL_SUBSYS_NFTABLES:
                attributes = _attributes(body[_NFGENMSG:])
                if kind & 0xFF == _NFT_MSG_NEWGEN:
                    pid = attributes.get(_NFTA_GEN_PROC_PID, b"")
                    foreign = len(pid) < 4 or not _own_thread(int.from_bytes(pid[:4], "big"))
                    changed = changed or (self._touched and foreign)
                    self._touched = False
                elif (body[0], attributes.get(_NFTA_OF_TABLE, b"").rstrip(b"\0")) in self._tables:
                    self._touched = True
            offset += (length + 3) & ~3
        return changed


def _attributes(data: bytes) -> dict[int, bytes]:
    """A netlink message's top-level attributes by type (the nested flag dropped)."""
    found: dict[int, bytes] = {}
    offset = 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        found.setdefault(kind & 0x3FFF, data[offset + 4:offset + length])
        offset += (length + 3) & ~3
    return found


class RulesetWatch:
    """Subscriptions opened in the calling thread's network namespace (they stay in it), for changes to
    `tables` ((family, name)) and to the routing rules."""

    def __init__(self, tables: Collection[tuple[str, str]]) -> None:
        self._transactions = Transactions(tables)
        self._sockets: list[socket.socket] = []
        try:
            nftables = self._open(_NETLINK_NETFILTER, 0)
            nftables.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
            self._open(socket.NETLINK_ROUTE, _RTMGRP_IPV4_RULE)
        except OSError:
            self.close()
            raise

    def _open(self, protocol: int, groups: int) -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                             protocol)
        self._sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
        sock.bind((0, groups))
        return sock

    async def changed(self, timeout: float) -> bool:
        """True once another program changed our tables or a routing rule (or the kernel dropped
        notifications, so nobody can say it did not), False when `timeout` passes first. Every
        notification waiting is read, so one burst of changes wakes the caller once."""
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), readable.set)
        try:
            async with asyncio.timeout(max(timeout, 0)):
                while not self._drain():
                    readable.clear()
                    await readable.wait()
            return True
        except TimeoutError:
            return False
        finally:
            for sock in self._sockets:
                loop.remove_reader(sock.fileno())

    def _drain(self) -> bool:
        changed = False
        for sock in self._sockets:
            while True:
                try:
                    datagram = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: the socket overflowed, and what was lost may have been anyone's
                    changed = True
                    break
                changed = self._transactions.feed(datagram) or changed
        return changed

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> RulesetWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
