"""A VM that stops answering is dropped on the rfb path too: the proxy's TCP leg keeps the line
alive with TCP keepalive (and TCP_USER_TIMEOUT), as the websockify leg does with WebSocket pings.

Real kernel TCP in a namespace this test makes: a "VNC server" there sends its banner, then an
nftables rule in that namespace drops everything it sends, as a frozen guest would answer nothing.
The viewer gets 1011 with the reason, within a few keepalive intervals; nothing is left open.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from ipaddress import IPv4Address

import pytest

from browservm.api.proxy import Upstream, ViewerProxy
from browservm.hostnet.netns import NetworkNamespace
from tests.unit.test_proxy import BANNER, close_of, controller, to, within

from .conftest import Namespaces, run

pytestmark = pytest.mark.host


def test_a_frozen_vm_is_dropped_by_tcp_keepalive(namespaces: Namespaces) -> None:
    ns = namespaces.create("frozen")
    run("ip", "link", "set", "lo", "up", netns=ns)
    netns = NetworkNamespace(ns)
    with netns.entered():
        listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    async def vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        await writer.drain()
        await reader.read()

    async def scenario() -> tuple[int | None, str | None]:
        async with await asyncio.start_server(vnc, sock=listener):
            proxy = ViewerProxy(ping_interval=1.0, close_timeout=1.0)
            upstream = Upstream(netns, IPv4Address("127.0.0.1"), port, websocket=False)
            async with controller(proxy, to(upstream)) as ctl, ctl.viewer() as viewer:
                assert await within(viewer.recv()) == BANNER
                subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], check=True, text=True, timeout=30,
                               input=("add table inet frozen\n"
                                      "add chain inet frozen output { type filter hook output priority 0; }\n"
                                      f"add rule inet frozen output tcp sport {port} drop\n"))
                # Within close_of's deadline (15 s), where the kernel's default keepalive would wait 2 hours:
                # idle 1 s, one probe 1 s later, unanswered.
                return await close_of(viewer)

    assert asyncio.run(scenario()) == (1011, "the VM stopped answering (TCP keepalive timed out)")
