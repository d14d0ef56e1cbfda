"""`browservm serve --tls-cert --tls-key` as an operator runs it (its VM network in a namespace of the
test's): it says it listens on https and which certificate it serves, answers over TLS, and the CLI
reaches it with --ca-file; the key's bytes appear nowhere in what it prints; an expired certificate
only warns."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.support.tls import Pair, make_pair

from .conftest import Namespaces

pytestmark = pytest.mark.host

ENV = {k: v for k, v in os.environ.items() if not k.startswith("BROWSERVM_")}


@contextmanager
def serving(netns: str, state: Path, pair: Pair) -> Iterator[list[str]]:
    """`serve` over TLS until it has printed its TLS line: its output so far (and on, as it prints)."""
    serve = subprocess.Popen([sys.executable, "-m", "browservm", "serve", "--netns", netns, "--state-dir", str(state),
                              "--listen", "127.0.0.1:0", "--vmm", "qemu", "--tls-cert", str(pair.cert),
                              "--tls-key", str(pair.key)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert serve.stdout is not None
        for line in serve.stdout:
            lines.append(line.rstrip())
            if line.startswith("  TLS:"):
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(60), lines
        yield lines
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        reader.join(10)
        subprocess.run([sys.executable, "-m", "browservm", "host", "down", "--netns", netns, "--state-dir",
                        str(state)], capture_output=True, timeout=120, check=False, env=ENV)
    assert serve.returncode == 0, lines


def test_serve_over_tls_names_its_certificate_answers_https_and_the_cli_trusts_it_by_ca_file(
        namespaces: Namespaces, tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    state = tmp_path / "state"
    with serving(namespaces.name("vms"), state, pair) as lines:
        url = next(line for line in lines if line.startswith("serve: listening on ")).split()[3].rstrip(";")
        assert url.startswith("https://127.0.0.1:"), lines
        assert any(line.startswith("  TLS:            CN=browservm test server (names: localhost, 127.0.0.1), "
                                   "valid until ") for line in lines), lines
        trusted = ssl.create_default_context(cafile=pair.cert)
        assert httpx.get(f"{url}/healthz", verify=trusted, trust_env=False).status_code == 200
        listed = subprocess.run([sys.executable, "-m", "browservm", "vm", "ls", "--url", url, "--ca-file",
                                 str(pair.cert), "--state-dir", str(state)],
                                capture_output=True, text=True, timeout=60, check=False, env=ENV)
        assert listed.returncode == 0 and listed.stdout.startswith("ID "), listed.stderr
    secret = b"".join(pair.key.read_bytes().splitlines()[1:-1]).decode()
    printed = "\n".join(lines)
    assert all(secret[i:i + 16] not in printed for i in range(0, len(secret) - 16, 8))


def test_serve_with_an_expired_certificate_starts_and_warns_naming_it(namespaces: Namespaces, tmp_path: Path) -> None:
    pair = make_pair(tmp_path, "old", expired=True)
    with serving(namespaces.name("vms"), tmp_path / "state", pair) as lines:
        assert any(f"tls: the certificate {pair.cert} expired on " in line for line in lines), lines
