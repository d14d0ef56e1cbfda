"""Which way the controller reaches a VM's desktop, and so which hops it passes on the way.

    rfb         TCP to the VNC server on the guest's :5901 (Xvnc, or the minimal image's x11vnc),
                RFB straight away (the default): nothing but the VNC server between the proxy
                and the screen
    websockify  TCP to websockify on the guest's :6080, a WebSocket upgrade, RFB inside it: the
                seed's path, kept for viewers that talk to the guest directly

Under software emulation websockify costs 18-25 s for the first upgrade after boot and about 1 s
for each later one (it starts a Python process per connection); the rfb path costs a TCP
handshake. Both ends need the VM's VNC password, which only the controller holds (rfb.py),
so the VNC server may listen on the guest's address. A VM's record keeps the path it was made with, so
the readiness hops, the proxy and the doctor agree on it even when the setting changes later.
"""

from __future__ import annotations

from dataclasses import dataclass

from browservm.errors import InvalidInput
from browservm.vm import hops

RFB = "rfb"
WEBSOCKIFY = "websockify"


@dataclass(frozen=True)
class DesktopPath:
    name: str
    port: int  # on the guest's address
    websocket: bool  # whether RFB travels inside a WebSocket (websockify) or straight on TCP
    # The desktop parts whose ready marker is the desktop.ready hop: the image runs one of them.
    listeners: tuple[str, ...]

    @property
    def listener(self) -> str:
        """The listener, as a person reads it in a message."""
        return " or ".join(self.listeners)

    @property
    def names(self) -> tuple[str, ...]:
        """Every hop a create passes on this path, in order."""
        return tuple(name for name in hops.NAMES if self.websocket or name != hops.WS_UPGRADE)


PATHS = {RFB: DesktopPath(RFB, 5901, websocket=False, listeners=("xvnc", "x11vnc")),
         WEBSOCKIFY: DesktopPath(WEBSOCKIFY, 6080, websocket=True, listeners=("websockify",))}


def desktop_path(name: str) -> DesktopPath:
    try:
        return PATHS[name]
    except KeyError:
        raise InvalidInput("desktop_path", name, f"must be one of {', '.join(PATHS)}") from None
