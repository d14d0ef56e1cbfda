"""The path a person uses, end to end: browser -> controller -> VM, with a real guest under QEMU (the `full`
image: Chromium on the VM's desktop), the real `browservm serve`, and Debian's Chromium on the host
(driven by Playwright) running the noVNC viewer page.

One serve, one VM for the viewer checks; a second VM whose VMM is killed while viewed; then serve is
stopped with SIGTERM (viewers get 1001, the VM survives) and a new serve re-finds the VM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from browservm.images.rootfs import RootfsImage
from tests.support.browsers import chromium, desktop_colours, remember_address_bar, wait_address_bar_changed

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]
_BOOT_S = 300.0



def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Serve:
    """`browservm serve` as a subprocess, its output kept line by line."""

    def __init__(self, controllers: Controllers, port: int, rootfs: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "browservm", "serve", "--netns", controllers.netns,
             "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
             "--rootfs", str(rootfs), "--vmm", "qemu", "--listen", f"127.0.0.1:{port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "BROWSERVM_MAX_VMS_PER_USER": "8"})
        self.lines: list[str] = []
        self._listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        assert self._listening.wait(120), "serve did not start listening:\n" + "\n".join(self.lines)
        self.key = (controllers.state_dir / "api.key").read_text().strip()
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=_BOOT_S,
                                 trust_env=False)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            if line.startswith("serve: listening"):
                self._listening.set()

    def create(self) -> dict[str, Any]:
        response = self.http.post("/v1/vms", params={"wait": "true"}, json={"user": "e2e"})
        assert response.status_code == 200, response.text
        vm: dict[str, Any] = response.json()
        assert vm["state"] == "ready", vm
        return vm

    def viewer_url(self, vm_id: str) -> str:
        response = self.http.post(f"/v1/vms/{vm_id}/viewer")
        assert response.status_code == 200, response.text
        url: str = response.json()["url"]
        return url

    def stop(self) -> int:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


def status_of(page: Page) -> dict[str, str]:
    result: dict[str, str] = page.eval_on_selector(
        "#status", "s => ({state: s.dataset.state, code: s.dataset.closeCode || '', text: s.textContent})")
    return result


def sent_to_vms(serve: Serve) -> float:
    """Bytes the controller relayed from viewers to VMs (its metric): each passed the proxy's check."""
    for line in serve.http.get("/metrics").text.splitlines():
        if line.startswith('browservm_proxy_bytes_total{direction="to_vm"}'):
            return float(line.split()[-1])
    return 0.0


def wait_status(page: Page, state: str, timeout_s: float = 120.0) -> dict[str, str]:
    page.wait_for_selector(f"#status[data-state='{state}']", timeout=timeout_s * 1000)
    return status_of(page)


def test_a_person_opens_the_desktop_through_the_controller_and_is_told_why_it_ends(
        controllers: Controllers, browser: Browser, full_image: RootfsImage) -> None:
    controllers.open()  # host up, so serve's own is unchanged
    serve = Serve(controllers, _free_port(), full_image.path)
    try:
        vm = serve.create()
        # A person's browser lets the page use their clipboard (Ctrl+V, and what is copied in the VM).
        page = browser.new_context(permissions=["clipboard-read", "clipboard-write"]).new_page()
        page.goto(serve.viewer_url(vm["vm_id"]))
        wait_status(page, "connected")
        colours = desktop_colours(page)
        assert colours >= 16, f"the canvas shows {colours} colour(s): no browser window on the desktop"

        # The clipboard both ways (issue 22), UTF-8 past Latin-1, on the fresh about:blank (a navigation under
        # way resets the address bar): what the person copied goes into the VM's Chromium's address bar by
        # Ctrl+V, and copied there (Ctrl+A, Ctrl+C) it comes back to the page. A copy made before the VM's
        # Chromium handled the keys before it copies what the bar held: so each step copies until its text
        # comes back, and the bar is known to have the keyboard before the paste.
        def copied_back(want: str) -> None:
            deadline = time.monotonic() + 60
            while page.input_value("#clipboard-text") != want:
                assert time.monotonic() < deadline, f"copied back: {page.input_value('#clipboard-text')!r}"
                page.keyboard.press("Control+a")
                page.keyboard.press("Control+c")
                with contextlib.suppress(PlaywrightTimeout):
                    page.wait_for_function("t => document.querySelector('#clipboard-text').value === t",
                                           arg=want, timeout=2000)

        marker = f"bar{time.monotonic_ns()}"
        page.evaluate("window.browservmRfb.focus()")
        page.keyboard.press("Control+l")
        page.keyboard.type(marker)
        copied_back(marker)  # the address bar has the keyboard
        # What is copied in the VM reaches the person's own clipboard too (the page writes it there).
        page.wait_for_function("m => navigator.clipboard.readText().then(t => t === m)", arg=marker, timeout=30_000)
        text = "pasted from the host: héllo wörld ✓ 日本語 " + str(time.monotonic_ns())
        page.evaluate("text => navigator.clipboard.writeText(text)", text)  # the person copies on their machine
        remember_address_bar(page)
        page.keyboard.press("Control+v")  # the page sends the clipboard to the VM, then Ctrl+V
        page.wait_for_selector("#clipboard[data-pasted='1']", state="attached", timeout=30_000)
        # A copy before Chromium has the text would copy the bar's old text (and own the clipboard, so the
        # paste then gets that): like a person, copy once the bar shows the paste.
        wait_address_bar_changed(page, timeout_s=60)
        copied_back(text)

        # The desktop follows the window (issue 22): the page asks for its size, the VM's Xvnc takes it, within
        # 800x600..2560x1600 (the toolbar takes 32 px; below the least, the page keeps 800x600 and scrolls).
        for (width, height), want in (((1500, 900), [1500, 868]), ((1000, 700), [1000, 668]),
                                      ((640, 480), [800, 600])):
            page.set_viewport_size({"width": width, "height": height})
            page.wait_for_function("([w, h]) => { const c = document.querySelector('#screen canvas');"
                                   " return c !== null && c.width === w && c.height === h; }", arg=want,
                                   timeout=60_000)

        # What a person does sends every kind of message noVNC has in use (pointer, keys, clipboard,
        # update requests); the proxy follows each (rfb.ClientMessages) and relays it.
        before = sent_to_vms(serve)
        page.mouse.move(300, 300)
        page.mouse.click(320, 310)
        page.keyboard.type("browservm")
        page.keyboard.press("Enter")
        page.evaluate("text => window.browservmRfb.clipboardPasteFrom(text)", "pasted from the host " * 100)
        deadline = time.monotonic() + 30
        # 20 key events of 8 bytes (9 letters and Enter, each pressed and released); the clipboard is Xvnc's
        # Extended Clipboard's: an announcement here, its text only when the VM asks (checked above).
        while sent_to_vms(serve) < before + 20 * 8 and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert sent_to_vms(serve) >= before + 20 * 8, (before, sent_to_vms(serve))
        assert status_of(page)["state"] == "connected", status_of(page)
        assert serve.http.get(f"/v1/vms/{vm['vm_id']}").json()["viewers"] == 1

        # The same page with a bad token: told why, in words, not "1006".
        bad = browser.new_page()
        bad.goto(f"{serve.url}/view/{vm['vm_id']}?token=v1.{vm['vm_id']}.9999999999.forged")
        refused = wait_status(bad, "refused")
        assert refused["code"] == "4401" and "not valid for this VM" in refused["text"], refused

        # The operator page: with the key the VM is listed; without it, no data (the sign-in form).
        operator = browser.new_page()
        operator.goto(f"{serve.url}/")
        assert operator.url.endswith("/login")
        operator.fill("input[name=key]", "wrong")
        operator.click("button[type=submit]")
        assert "not right" in operator.inner_text("#message")
        operator.fill("input[name=key]", serve.key)
        operator.click("button[type=submit]")
        operator.wait_for_selector(f"tr[data-vm-id='{vm['vm_id']}']", timeout=30_000)
        assert "ready" in operator.inner_text(f"tr[data-vm-id='{vm['vm_id']}']")

        # A second VM, viewed, whose VMM is killed: the viewer is told it is gone (4410), the API says failed.
        doomed = serve.create()
        victim = browser.new_page()
        victim.goto(serve.viewer_url(doomed["vm_id"]))
        wait_status(victim, "connected")
        os.kill(doomed["pid"], signal.SIGKILL)
        gone = wait_status(victim, "closed", 30)
        assert gone["code"] == "4410" and "failed at vmm.exited" in gone["text"], gone
        shown = serve.http.get(f"/v1/vms/{doomed['vm_id']}").json()
        assert shown["state"] == "failed" and shown["failure"]["hop"] == "vmm.exited"

        # SIGTERM to serve: the viewer gets 1001 with a reason, the VM keeps running.
        assert serve.stop() == 0
        stopped = wait_status(page, "closed", 30)
        assert stopped["code"] == "1001" and "shutting down" in stopped["text"], stopped
        assert Path(f"/proc/{vm['pid']}").exists()
        assert any(line.startswith("serve: stopped; VMs left running") for line in serve.lines), serve.lines

        # A new serve re-finds the VM, and a new viewer connects.
        serve = Serve(controllers, _free_port(), full_image.path)
        assert f"reconcile: {vm['vm_id']}: VMM {vm['pid']} alive, watching" in serve.lines, serve.lines
        again = browser.new_page()
        again.goto(serve.viewer_url(vm["vm_id"]))
        wait_status(again, "connected")
        assert json.loads(serve.http.get(f"/v1/vms/{vm['vm_id']}").text)["state"] == "ready"
    finally:
        serve.stop()
