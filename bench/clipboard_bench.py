"""The clipboard through the viewer as a person uses it: a paste from the page into the VM, and the copy back.

Run as root, holding the VM lock: flock /tmp/browservm-vm.lock .venv/bin/python bench/clipboard_bench.py [--rounds 20]

One VM of the `full` image under the real `browservm serve` (QEMU; TCG on these machines), its viewer page
in Debian's headless Chromium (Playwright) with clipboard permission, as a person's browser gives it. The
rounds alternate, each in the VM's Chromium address bar (focused by Ctrl+L first):

  typed    Ctrl+L, a marker typed (some 25 keys), then Ctrl+A, Ctrl+C: until the page's clipboard panel
           shows the marker
  pasted   the person's clipboard set to a new text (1 KiB of UTF-8 beyond Latin-1), Ctrl+V (the page reads
           it, sends it to the VM, then the keys), Ctrl+A, Ctrl+C: until the panel shows that text

`typed` is the baseline measured in the same run: keys and the copy back, no paste. What a paste adds is
the difference of the medians. A copy made before the VM's Chromium handled the key or the paste brings
back the bar's old text: the copy is made again every 0.5 s until the text comes back (which bounds the
resolution of both kinds alike). A 64 KiB paste is measured the same way at the end. Nothing asserts a time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

sys.path.insert(0, str(Path(__file__).resolve().parent))  # session_bench: serve, a ready VM, the teardown
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # what the tests know of the viewer page
from session_bench import BOOT_S, ready_record, serving, teardown

from browservm.config import load_settings
from browservm.controller import resolve_images
from browservm.progress import Progress
from tests.support.browsers import remember_address_bar, wait_address_bar_changed

CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 60_000  # for any one round trip, at most
RECOPY_MS = 500  # a copy that did not bring the text back is tried again after this


def copied_back(page: Page, text: str) -> None:
    """Ctrl+A, Ctrl+C in the VM until the page's clipboard panel holds `text`: Chromium pastes (or types)
    once its event is handled, and a copy before that copies what the bar held before. Then until the
    page has also written it into the person's clipboard: a write of ours after that is the newest."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        page.keyboard.press("Control+a")
        page.keyboard.press("Control+c")
        try:
            page.wait_for_function("text => document.querySelector('#clipboard-text').value === text", arg=text,
                                   polling=10, timeout=RECOPY_MS)
            break
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise
    page.wait_for_function("text => navigator.clipboard.readText().then(t => t === text)", arg=text, timeout=WAIT_MS)


def typed(page: Page, marker: str) -> float:
    """The address bar selected (Ctrl+L), `marker` typed, until it comes back by a copy."""
    started = time.perf_counter()
    page.keyboard.press("Control+l")
    page.keyboard.type(marker)
    copied_back(page, marker)
    return time.perf_counter() - started


def pasted(page: Page, text: str, count: int) -> float:
    """The person's clipboard set to `text`, Ctrl+V into the bar (which has the keyboard: a typed round came
    just before), until it comes back by a copy."""
    page.evaluate("text => navigator.clipboard.writeText(text)", text)
    remember_address_bar(page)
    started = time.perf_counter()
    page.keyboard.press("Control+v")
    # The page sends the clipboard, then Ctrl+V, once it has read it: the next keys must come after. And a
    # copy before the bar shows the paste would copy its old text, and own the clipboard the paste reads.
    page.wait_for_selector(f"#clipboard[data-pasted='{count}']", state="attached", timeout=WAIT_MS)
    wait_address_bar_changed(page, WAIT_MS / 1000)
    copied_back(page, text)
    return time.perf_counter() - started


def text_of(size: int, n: int) -> str:
    """About `size` bytes of UTF-8, ending in no space: the address bar keeps a pasted line but its end's."""
    unit = f"round {n}: héllo wörld ✓ 日本語 "
    return (unit * (size // len(unit.encode()) + 1)).encode()[:size].decode(errors="ignore").rstrip()


def measure(work: Path, rounds: int) -> tuple[list[float], list[float], float | str, list[int]]:
    progress = Progress()
    state_dir = work / "state"
    netns_name = f"bvclip-{os.getpid()}"
    settings = load_settings(netns=netns_name, state_dir=state_dir, vmm="qemu", image_profile="full")
    images = resolve_images(settings, progress)
    argv = [sys.executable, "-m", "browservm", "serve", "--netns", netns_name, "--state-dir", str(state_dir),
            "--vmm", "qemu", "--kernel", str(images.kernel), "--rootfs", str(images.rootfs), "--stop-vms-on-exit"]
    keys: list[float] = []
    pastes: list[float] = []
    lost: list[int] = []  # rounds whose paste did not come back
    try:
        with serving(argv, state_dir) as serve:
            answer = serve.api.post("/v1/vms", json={"user": "bench"})
            answer.raise_for_status()
            record = ready_record(serve, answer.json())
            url = serve.api.post(f"/v1/vms/{record['vm_id']}/viewer").json()["url"]
            progress.stage("vm", f"{record['vm_id']} ready; the viewer opens")
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                     args=["--no-sandbox", "--disable-gpu"])
                try:
                    page = browser.new_context(permissions=["clipboard-read", "clipboard-write"]).new_page()
                    page.goto(url)
                    page.wait_for_selector("#status[data-state='connected']", timeout=BOOT_S * 1000)
                    page.evaluate("window.browservmRfb.focus()")
                    for n in range(rounds):
                        keys.append(typed(page, f"marker{n}x{time.monotonic_ns()}"))
                        try:
                            pastes.append(pasted(page, text_of(1024, n), n + 1))
                        except PlaywrightTimeout:  # counted and said; the next round's typing starts afresh
                            lost.append(n + 1)
                            progress.stage(f"round {n + 1}/{rounds}", "the paste did not come back within "
                                                                      f"{WAIT_MS / 1000:g} s")
                            continue
                        progress.stage(f"round {n + 1}/{rounds}", f"typed {keys[-1] * 1000:.0f} ms, "
                                                                  f"pasted {pastes[-1] * 1000:.0f} ms")
                    try:
                        large: float | str = pasted(page, text_of(64 * 1024, rounds), rounds + 1)
                    except PlaywrightTimeout as exc:  # the address bar may not take it whole: said, not hidden
                        large = f"not measured ({str(exc).splitlines()[0]})"
                finally:
                    browser.close()
    finally:
        teardown(settings, state_dir, netns_name)
    return keys, pastes, large, lost


def _ms(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each kind (default 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bvbench-clip-") as scratch:
        keys, pastes, large, lost = measure(Path(scratch), args.rounds)
    print(f"\nclipboard through the viewer, {args.rounds} rounds each (load {os.getloadavg()[0]:.2f}):")
    print(f"  typed  (baseline)  p50 {_ms(keys, 0.5):7.0f} ms   p95 {_ms(keys, 0.95):7.0f} ms")
    if pastes:
        print(f"  pasted (1 KiB)     p50 {_ms(pastes, 0.5):7.0f} ms   p95 {_ms(pastes, 0.95):7.0f} ms   "
              f"{statistics.median(pastes) / statistics.median(keys):.2f}x the baseline, "
              f"{(statistics.median(pastes) - statistics.median(keys)) * 1000:+.0f} ms")
    if lost:
        print(f"  pastes that did not come back within {WAIT_MS / 1000:g} s: rounds {', '.join(map(str, lost))}")
    shown = f"{large * 1000:7.0f} ms" if isinstance(large, float) else large
    print(f"  pasted (64 KiB)    {shown}")


if __name__ == "__main__":
    main()
