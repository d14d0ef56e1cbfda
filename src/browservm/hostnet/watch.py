"""The kernel's word that another program changed the namespace's nftables ruleset or routing rules.

The drift check (drift.py) puts our tables and rules back; run on a timer, a flush went unnoticed
until its next tick, and in the host's own namespace a VM could reach a host service on the gateway
address meanwhile (README, "The firewall stays in place"). Subscribed to nftables' notifications
(NFNLGRP_NFTABLES) and the IPv4 routing rules' (RTNLGRP_IPV4_RULE), the controller hears of every
change as it is committed. Every nftables transaction ends in a NEWGEN message naming the thread that
committed it: those of this process's own threads (a VM's set elements, added in-process) are ours
and wake nobody; an `nft` process, ours or not, and any routing-rule change do.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

_NETLINK_NETFILTER = 12
_NFNLGRP_NFTABLES = 7
_RTMGRP_IPV4_RULE = 0x80  # RTNLGRP_IPV4_RULE (8) as a bind() mask
_SOL_NETLINK = 270
_NETLINK_ADD_MEMBERSHIP = 1
_NFT_MSG_NEWGEN = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
_NFTA_GEN_PROC_PID = 2
_RTM_NEWRULE, _RTM_DELRULE = 32, 33
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_NFGENMSG = 4  # family, version, resource id
_RECEIVE_BUFFER = 1 << 20  # a burst of notifications (a restored table with many VMs' elements) fits


def _own_thread(tid: int) -> bool:
    """Whether `tid` is one of this process's threads. The kernel names the committing thread by its
    id in the first pid namespace: in a container of our own it matches none, and every change then
    counts as foreign, which costs a check and never misses one."""
    return os.path.exists(f"/proc/self/task/{tid}")


def foreign_changes(datagram: bytes) -> bool:
    """Whether the netlink messages in `datagram` announce a change another process (or a routing-rule
    change by anyone) committed."""
    offset = 0
    while offset + _HEADER.size <= len(datagram):
        length, kind, _, _, _ = _HEADER.unpack_from(datagram, offset)
        if length < _HEADER.size or offset + length > len(datagram):
            return True  # cut short or malformed: look rather than guess
        if kind in (_RTM_NEWRULE, _RTM_DELRULE):
            return True
        if kind == _NFT_MSG_NEWGEN:
            pid = _attribute_u32_be(datagram[offset + _HEADER.size + _NFGENMSG:offset + length], _NFTA_GEN_PROC_PID)
            if pid is None or not _own_thread(pid):
                return True
        offset += (length + 3) & ~3
    return False


def _attribute_u32_be(attributes: bytes, wanted: int) -> int | None:
    offset = 0
    while offset + 4 <= len(attributes):
        length, kind = struct.unpack_from("=HH", attributes, offset)
        if length < 4:
            return None
        if kind & 0x3FFF == wanted and length >= 8:
            value: int = struct.unpack_from(">I", attributes, offset + 4)[0]
            return value
        offset += (length + 3) & ~3
    return None


class RulesetWatch:
    """Subscriptions opened in the calling thread's network namespace; they stay in it."""

    def __init__(self) -> None:
        self._sockets: list[socket.socket] = []
        try:
            tables = self._open(_NETLINK_NETFILTER, 0)
            tables.setsockopt(_SOL_NETLINK, _NETLINK_ADD_MEMBERSHIP, _NFNLGRP_NFTABLES)
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
        """True once another program changed the ruleset or a routing rule (or the kernel dropped
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
        foreign = False
        for sock in self._sockets:
            while True:
                try:
                    datagram = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                except OSError:  # ENOBUFS: the socket overflowed, and what was lost may have been anyone's
                    foreign = True
                    break
                foreign = foreign_changes(datagram) or foreign
        return foreign

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()

    def __enter__(self) -> RulesetWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
