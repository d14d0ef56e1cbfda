"""Nagle's algorithm is off on the controller's TCP connections, both ways.

asyncio turns it off only on sockets created as IPPROTO_TCP; with it on, uvicorn's responses (head
and body written apart) waited for the client's delayed ACK, 40 ms per request after a
connection's first, and small viewer messages stalled the same way. Checked on the real sockets:
the connections serve's listener accepts under uvicorn, and the transports made from
connect_socket, as the proxy and the probes make them.
"""

from __future__ import annotations

import asyncio
import socket
from ipaddress import IPv4Address

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from browservm.cli.serve import listen_socket
from browservm.config import load_settings
from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.readiness import connect_socket

DEADLINE = 15.0


def nagle_off(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_connections_serve_accepts_have_nagle_off() -> None:
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hello")

    async def scenario() -> list[bool]:
        listener = listen_socket(load_settings(listen="127.0.0.1:0"))
        server = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/", hello)]), lifespan="off",
                                               log_config=None, log_level="warning"))
        running = asyncio.create_task(server.serve(sockets=[listener]))
        try:
            async with asyncio.timeout(DEADLINE):
                reader, writer = await asyncio.open_connection(*listener.getsockname()[:2])
                writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                await reader.readuntil(b"hello")
                accepted = [connection.transport.get_extra_info("socket")
                            for connection in server.server_state.connections]
                writer.close()
            return [nagle_off(sock) for sock in accepted]
        finally:
            server.should_exit = True
            await running
            listener.close()

    assert asyncio.run(scenario()) == [True]


def test_transports_on_connect_socket_have_nagle_off() -> None:
    async def scenario() -> bool:
        server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            sock = await connect_socket(NetworkNamespace(None), IPv4Address("127.0.0.1"), port, DEADLINE)
            _, writer = await asyncio.open_connection(sock=sock)
            try:
                return nagle_off(writer.get_extra_info("socket"))
            finally:
                writer.close()

    assert asyncio.run(scenario())
