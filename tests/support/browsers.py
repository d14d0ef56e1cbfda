"""What the tests that look at pages share: Debian's Chromium under Playwright, and a uvicorn that
says when it has started (for a thread to wait on)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from playwright.sync_api import Browser, Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")


@contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium (Debian's), or the test skipped naming what installs it."""
    if not CHROMIUM.exists():
        pytest.skip("needs Debian's chromium (scripts/install.sh installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            yield launched
        finally:
            launched.close()


# Reads the noVNC canvas and counts its distinct colours: an empty canvas has one (or none).
_DISTINCT_COLOURS = """() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas || !canvas.width) return 0;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4 * 97) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return seen.size;
}"""


def desktop_colours(page: Page, want: int = 16, timeout_s: float = 60.0) -> int:
    """The distinct colours of the viewer page's canvas once it shows `want` of them (a browser window on
    the desktop does), or as many as it shows at the deadline."""
    deadline = time.monotonic() + timeout_s
    while (colours := int(page.evaluate(_DISTINCT_COLOURS))) < want and time.monotonic() < deadline:
        page.wait_for_timeout(250)
    return colours


# The VM's Chromium's address bar row on the viewer page's noVNC canvas (the VM's framebuffer): remembered,
# then "changed" once over 500 of its pixels differ (a blinking caret is some 40, a pasted line thousands).
_ADDRESS_BAR = "document.querySelector('#screen canvas').getContext('2d').getImageData(150, 40, 850, 50).data"


def remember_address_bar(page: Page) -> None:
    page.evaluate(f"() => {{ window.addressBarBefore = {_ADDRESS_BAR}; }}")


def wait_address_bar_changed(page: Page, timeout_s: float) -> None:
    """Until the VM's address bar shows something else than when remembered (a paste landed, say): what a
    person waits for before copying it again."""
    page.wait_for_function(f"""() => {{ const now = {_ADDRESS_BAR}; let changed = 0;
      for (let i = 0; i < now.length; i += 4) if (now[i] !== window.addressBarBefore[i]) changed++;
      return changed > 500; }}""", timeout=timeout_s * 1000)


class ReadyServer(uvicorn.Server):
    """uvicorn that says when it has started, for a thread to wait on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()


@contextmanager
def served_in_thread(app: Any, listener: socket.socket, deadline: float,
                     before_exit: Callable[[asyncio.AbstractEventLoop], None]) -> Iterator[asyncio.AbstractEventLoop]:
    """`app` on a real uvicorn in a thread of its own, serving `listener`; its event loop while it runs.
    `before_exit(loop)` runs (when it started) before uvicorn is told to exit; the listener is closed after."""
    server = ReadyServer(uvicorn.Config(app, lifespan="off", log_level="warning", timeout_graceful_shutdown=2))
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        await server.serve(sockets=[listener])

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="uvicorn")
    thread.start()
    try:
        assert server.ready.wait(deadline) and server.started
        yield loops[0]
    finally:
        if loops and server.started:
            before_exit(loops[0])
        server.should_exit = True
        thread.join(deadline)
        listener.close()
