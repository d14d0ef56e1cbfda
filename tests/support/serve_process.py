"""`browservm serve` as a subprocess for the end-to-end tests, on a controller namespace of the tests'
(`Controllers`), with the sample OAuth provider of tests/support/oauth_server.py on the VM network's
gateway."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def sample_provider(directory: Path, issuer: str, template: str | None = None) -> Path:
    """A providers file with the guest's sample login tool, signing in at `issuer`."""
    providers = directory / "providers.toml"
    providers.write_text(
        "[providers.sample]\ncommand = [\"/usr/lib/browservm/bin/browservm-sample-login\", \"--issuer\", "
        f"\"{issuer}\", \"--credentials\", \"/home/browser/.sample/credentials.json\", \"--port\", \"0\"]\n"
        "required_keys = [\"access_token\", \"refresh_token\"]\n"
        + (f"template = \"{template}\"\n" if template else ""))
    return providers


class Serving:
    def __init__(self, process: subprocess.Popen[str], port: int, state_dir: Path) -> None:
        self.process = process
        self.port = port
        self.state_dir = state_dir
        self.output: list[str] = []
        self.listening = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if line.startswith("serve: listening"):
                self.listening.set()

    def client(self, timeout: float = 120) -> httpx.Client:
        """A client with the controller's own key, once it listens."""
        assert self.listening.wait(120), "".join(self.output)
        key = (self.state_dir / "api.key").read_text().strip()
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"Authorization": f"Bearer {key}"},
                            timeout=timeout, trust_env=False)


@contextmanager
def serving(netns: str, state_dir: Path, kernel: Path, options: Sequence[str],
            env: dict[str, str]) -> Iterator[Serving]:
    """`browservm serve` with QEMU on 127.0.0.1 (a free port) until the block ends, then SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "browservm", "serve", "--netns", netns, "--state-dir", str(state_dir),
         "--kernel", str(kernel), "--vmm", "qemu", "--listen", f"127.0.0.1:{port}", *options],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **env})
    try:
        yield Serving(process, port, state_dir)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
