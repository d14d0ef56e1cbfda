"""A front's relay of a viewer's WebSocket to the proxy of the VM's host, and back.

    browser ──WS /v1/vms/{id}/vnc──► front ──WS──► host's controller (its ViewerProxy) ──► the VM

The front checks nothing of the viewer's: the token is the host's to judge, and every close code the
host's proxy sends (4401, 4404, 4409, 4410, 4429, 4502, 1000, 1001, 1002, 1003, 1009, 1011) reaches the
browser unchanged, with its reason. What is the front's own:

    4404  the record has no VM of that id, or it is not running on a host (pending, lost)
    4503  the VM's host cannot be reached: "host <name>: <why>"

Flow control as in the host's proxy: each direction awaits its send before it reads the next message.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.typing import Subprotocol

from browservm.api.proxy import close_reason

NO_ROUTE = 4404
HOST_UNREACHABLE = 4503
_OPEN_TIMEOUT = 10.0
_HOST_MAX_MESSAGE = 4 * 2**20  # the host's proxy sends at most 64 KiB a message; a bound all the same
_NO_STATUS = (1005, 1006)  # "none received" and "abnormal": not codes one may send


async def refuse(websocket: WebSocket, code: int, reason: str) -> int:
    """Accept, then close with a code and reason: a browser cannot see why a handshake was refused."""
    offered = websocket.scope.get("subprotocols", [])
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    await websocket.close(code, close_reason(reason))
    return code


async def relay(websocket: WebSocket, upstream_url: str, host: str) -> int:
    """Relay until one side ends; the close code the browser got (or the one it closed with)."""
    offered = websocket.scope.get("subprotocols", [])
    subprotocols = [Subprotocol("binary")] if "binary" in offered else None
    try:
        upstream = await connect(upstream_url, subprotocols=subprotocols, compression=None, proxy=None,
                                 open_timeout=_OPEN_TIMEOUT, max_size=_HOST_MAX_MESSAGE)
    except (OSError, InvalidHandshake, TimeoutError) as error:
        return await refuse(websocket, HOST_UNREACHABLE, f"host {host}: {error or type(error).__name__}")
    async with upstream:  # closed however this ends, the browser gone before its accept included
        await websocket.accept(subprotocol=upstream.subprotocol)
        to_host = asyncio.create_task(_browser_to_host(websocket, upstream))
        to_browser = asyncio.create_task(_host_to_browser(upstream, websocket))
        try:
            done, _ = await asyncio.wait({to_host, to_browser}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (to_host, to_browser):
                task.cancel()
            await asyncio.gather(to_host, to_browser, return_exceptions=True)
        first = done.pop()
        return first.result() if not first.cancelled() and first.exception() is None else 1011


async def _browser_to_host(websocket: WebSocket, upstream: ClientConnection) -> int:
    while True:
        message: Any = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            code = int(message.get("code") or 1000)
            await upstream.close(1000 if code in _NO_STATUS else code, message.get("reason") or "")
            return code
        data = message.get("bytes")
        try:
            await upstream.send(data if data is not None else message.get("text") or "")
        except ConnectionClosed:
            await asyncio.Future()  # the other pump ends the relay, with the host's code


async def _host_to_browser(upstream: ClientConnection, websocket: WebSocket) -> int:
    try:
        async for message in upstream:
            if isinstance(message, bytes):
                await websocket.send_bytes(message)
            else:
                await websocket.send_text(message)
    except ConnectionClosed:
        pass
    code = upstream.close_code if upstream.close_code not in (None, *_NO_STATUS) else 1011
    assert code is not None
    reason = upstream.close_reason or ("" if code != 1011 else "the connection to the host ended abnormally")
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the browser left meanwhile
        await websocket.close(code, close_reason(reason))
    return code
