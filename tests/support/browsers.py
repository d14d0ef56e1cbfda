"""What the tests that look at pages share: Debian's Chromium under Playwright, and a uvicorn that
says when it has started (for a thread to wait on)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from playwright.sync_api import Browser, sync_playwright

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


class ReadyServer(uvicorn.Server):
    """uvicorn that says when it has started, for a thread to wait on."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.ready.set()
