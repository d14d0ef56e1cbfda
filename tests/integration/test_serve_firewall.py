"""A running controller puts its firewall back when another tool flushes it (Debian's nftables
service does on reload), within seconds, and says so."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import Namespaces, run

pytestmark = pytest.mark.host


def test_serve_restores_its_tables_after_nft_flush_ruleset(namespaces: Namespaces, tmp_path: Path) -> None:
    netns = namespaces.name("vms")
    serve = subprocess.Popen([sys.executable, "-m", "browservm", "serve", "--netns", netns, "--state-dir",
                              str(tmp_path / "state"), "--listen", "127.0.0.1:0", "--vmm", "qemu"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert serve.stdout is not None
        for line in serve.stdout:
            lines.append(line.rstrip())
            if line.startswith("serve: listening"):
                listening.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert listening.wait(60), lines
        before = run("nft", "list", "table", "inet", "browservm", netns=netns).stdout
        run("nft", "flush", "ruleset", netns=netns)
        flushed_at = time.monotonic()
        while run("nft", "list", "table", "inet", "browservm", netns=netns, check=False).returncode != 0:
            assert time.monotonic() - flushed_at < 15, "the table was not put back within 15 s"
            time.sleep(0.2)
        assert run("nft", "list", "table", "inet", "browservm", netns=netns).stdout == before
        deadline = time.monotonic() + 10
        while not any("host network drift" in line for line in lines):
            assert time.monotonic() < deadline, lines
            time.sleep(0.1)
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "browservm", "host", "down", "--netns", netns, "--state-dir",
                        str(tmp_path / "state")], capture_output=True, timeout=120, check=False)
