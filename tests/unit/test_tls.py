"""`serve --tls-cert --tls-key`: the controller over HTTPS and wss, and the pair checked before it starts.

The server is serve's own path (listen_socket, load_server_tls, uvicorn_config, ServiceServer) on a real
uvicorn on loopback, its service on the fakes of the manager's tests (a `sleep` as the VMM, the guest's
hops as gates). Certificates are made here with `cryptography`: self-signed for 127.0.0.1, so the
certificate is its own CA file.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx
import pytest
import websockets
from cryptography.hazmat.primitives import serialization

from browservm.api.service import ControllerService
from browservm.api.tls import TlsFileError, load_server_tls
from browservm.api.tokens import ViewerTokens
from browservm.cli import main
from browservm.cli.serve import ServiceServer, listen_socket, uvicorn_config
from browservm.client import Client, ControllerUnreachable, UntrustedCertificate
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.errors import InvalidInput
from browservm.hostnet.host import HostNetwork
from browservm.vm.parts import Limits
from tests.support.tls import NOW, Pair, make_pair

from .fakes import FakeProbes, Parts, make_parts, stop_all

KEY = "test-api-key-0123456789"
DEADLINE = 30.0


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


@dataclass
class Served:
    url: str  # https://127.0.0.1:PORT
    pair: Pair
    state_dir: Path
    parts: Parts
    probes: FakeProbes
    loop: asyncio.AbstractEventLoop

    def trusting(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.pair.cert)


@pytest.fixture
def served(tmp_path: Path, pair: Pair, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    """serve over TLS, as cli/serve.py runs it (without the state directory's lock and host network)."""
    for name in ("BROWSERVM_URL", "BROWSERVM_API_KEY", "BROWSERVM_CA_FILE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    parts = make_parts(tmp_path)
    probes = FakeProbes(parts.ipam)
    manager = parts.manager(probes, limits=Limits(max_vms=4, max_vms_per_user=4))
    settings = load_settings(state_dir=tmp_path, listen="127.0.0.1:0", tls_cert=pair.cert, tls_key=pair.key)
    tls = load_server_tls(pair.cert, pair.key)
    listener = listen_socket(settings)
    port = listener.getsockname()[1]
    settings = settings.model_copy(update={"listen": f"127.0.0.1:{port}"})
    service = ControllerService(Controller(settings, parts.store, cast(HostNetwork, parts.network), manager),
                                api_key=KEY, tokens=ViewerTokens(os.urandom(32)))
    (tmp_path / "api.key").write_text(KEY + "\n")
    server = ServiceServer(uvicorn_config(service, tls), service, signals=False)
    loops: list[asyncio.AbstractEventLoop] = []

    async def serve() -> None:
        loops.append(asyncio.get_running_loop())
        try:
            await server.serve(sockets=[listener])
        finally:
            await service.stop()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), name="uvicorn-tls")
    thread.start()
    try:
        started = threading.Event()
        while not server.started and thread.is_alive() and not started.wait(0.01):
            pass
        assert server.started, "the TLS server did not start"
        yield Served(settings.base_url, pair, tmp_path, parts, probes, loops[0])
    finally:
        for event in probes.hang.values():  # a hop left hanging would hold its create
            if loops:
                loops[0].call_soon_threadsafe(event.set)
        server.should_exit = True
        thread.join(DEADLINE)
        listener.close()
        stop_all(parts)
    assert not thread.is_alive()


def test_the_api_answers_over_https_its_viewer_link_is_https_and_the_desktop_is_wss(served: Served) -> None:
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", served.url)
    served.probes.hang_at("guest.network")  # booting: viewable, without a desktop yet
    with Client(served.url, api_key=KEY, ca_file=served.pair.cert) as bvm:
        vm = bvm.create_vm("ann", mem_mib=512)
        viewer = bvm.viewer(vm.vm_id)
    assert viewer.url.startswith(f"{served.url}/view/{vm.vm_id}?token=")
    with httpx.Client(verify=served.trusting(), trust_env=False) as https:
        page = https.get(viewer.url)
        assert page.status_code == 200
        # The page takes its WebSocket's scheme from its own location: wss on an https page.
        assert 'location.protocol === "https:" ? "wss" : "ws"' in page.text
        # The operator's session cookie is only ever sent back over TLS.
        signed_in = https.post(f"{served.url}/login", content=f"key={KEY}",
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert signed_in.status_code == 303 and "secure" in signed_in.headers["set-cookie"].lower()

    async def desktop() -> tuple[int, str]:
        ws_url = f"wss://{served.url.removeprefix('https://')}/v1/vms/{vm.vm_id}/vnc?token={viewer.token}"
        async with websockets.connect(ws_url, ssl=served.trusting(), subprotocols=[websockets.Subprotocol("binary")],
                                      open_timeout=DEADLINE) as socket:
            with pytest.raises(websockets.ConnectionClosed):
                await asyncio.wait_for(socket.recv(), DEADLINE)
            assert socket.close_code is not None
            return socket.close_code, socket.close_reason or ""

    code, reason = asyncio.run(desktop())
    assert code == 4409 and reason in ("the VM is creating", "the VM is booting"), (code, reason)  # through wss


def test_the_cli_reaches_it_with_ca_file_and_names_an_untrusted_certificate_without_it(
        served: Served, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    base = ["vm", "ls", "--url", served.url, "--state-dir", str(served.state_dir)]
    assert main([*base, "--ca-file", str(served.pair.cert), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    monkeypatch.setenv("BROWSERVM_CA_FILE", str(served.pair.cert))
    assert main([*base, "--json"]) == 0 and json.loads(capsys.readouterr().out) == []
    monkeypatch.delenv("BROWSERVM_CA_FILE")

    assert main(base) == 1  # the system's CAs do not know a self-signed certificate: never trusted silently
    err = capsys.readouterr().err
    assert f"the certificate of {served.url} is not trusted (" in err and "--ca-file" in err, err
    with pytest.raises(UntrustedCertificate):
        Client(served.url, api_key=KEY).list_vms()

    other = make_pair(served.state_dir, "other")  # a CA file, but not the one that signed it
    assert main([*base, "--ca-file", str(other.cert)]) == 1 and "is not trusted" in capsys.readouterr().err
    assert main([*base, "--ca-file", str(served.state_dir / "absent.pem")]) == 2
    assert f"ca_file: does not exist (got '{served.state_dir / 'absent.pem'}')" in capsys.readouterr().err


def test_plain_http_to_the_tls_port_fails_and_says_https(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    plain = "http://" + served.url.removeprefix("https://")
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{plain}/healthz", trust_env=False)
    with pytest.raises(ControllerUnreachable, match=r"if it serves TLS \(serve --tls-cert\), its URL is https://"):
        Client(plain, api_key=KEY).list_vms()
    assert main(["vm", "ls", "--url", plain, "--state-dir", str(served.state_dir)]) == 1
    assert "its URL is https://" in capsys.readouterr().err
    # The server took it in its stride: the next request over TLS is answered.
    assert httpx.get(f"{served.url}/healthz", verify=served.trusting(), trust_env=False).status_code == 200


# --- the pair, checked before anything starts ------------------------------------------------------

def test_a_key_of_another_certificate_is_refused_naming_both_files(tmp_path: Path) -> None:
    one, other = make_pair(tmp_path, "one"), make_pair(tmp_path, "other")
    with pytest.raises(TlsFileError) as refused:
        load_server_tls(one.cert, other.key)
    assert refused.value.field == "tls_key"
    assert str(refused.value).startswith(f"--tls-key {other.key}: is not the key of the certificate {one.cert}")


@pytest.mark.parametrize("case", ["missing cert", "missing key", "unreadable key", "cert is a key", "key is a cert",
                                  "encrypted key", "key open to others", "directory"])
def test_each_bad_file_is_named_with_its_reason(tmp_path: Path, pair: Pair, case: str) -> None:
    cert, key = pair.cert, pair.key
    secret = b"".join(key.read_bytes().splitlines()[1:-1]).decode()
    field, reason = {
        "missing cert": ("tls_cert", "does not exist"), "missing key": ("tls_key", "does not exist"),
        "unreadable key": ("tls_key", "cannot be read: Permission denied"),
        "cert is a key": ("tls_cert", "is not a PEM certificate (-----BEGIN CERTIFICATE-----) (it holds a private "
                                      "key: is it the --tls-key file?)"),
        "key is a cert": ("tls_key", "is not a PEM private key"),
        "encrypted key": ("tls_key", "is encrypted with a passphrase"),
        "key open to others": ("tls_key", "is open to every user of this host (mode 0644)"),
        "directory": ("tls_cert", "is a directory, not a file")}[case]
    if case == "missing cert":
        cert = tmp_path / "absent.crt"
    elif case == "missing key":
        key = tmp_path / "absent.key"
    elif case == "unreadable key":
        if os.geteuid() == 0:
            pytest.skip("root reads a file of mode 0000")
        key.chmod(0)
    elif case == "cert is a key":
        cert = key
    elif case == "key is a cert":
        key = tmp_path / "copy.crt"
        key.write_bytes(cert.read_bytes())
        key.chmod(0o600)
    elif case == "encrypted key":
        private = serialization.load_pem_private_key(key.read_bytes(), None)
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"passphrase")))
    elif case == "key open to others":
        key.chmod(0o644)
    elif case == "directory":
        cert = tmp_path
    with pytest.raises(TlsFileError) as refused:
        load_server_tls(cert, key)
    error = refused.value
    assert error.field == field and reason in error.reason, (error.field, error.reason)
    path = cert if field == "tls_cert" else key
    assert str(error).startswith(f"--{field.replace('_', '-')} {path}: ")
    assert secret[:24] not in str(error)  # never a piece of the key


def test_a_group_readable_key_is_taken_and_an_expired_certificate_only_warns(tmp_path: Path) -> None:
    fresh = make_pair(tmp_path, "fresh")
    fresh.key.chmod(0o640)  # root:ssl-cert, Debian's convention
    assert load_server_tls(fresh.cert, fresh.key).warnings == ()
    old = make_pair(tmp_path, "old", expired=True)
    tls = load_server_tls(old.cert, old.key)
    assert len(tls.warnings) == 1 and tls.warnings[0].startswith(f"the certificate {old.cert} expired on ")
    assert "127.0.0.1" in tls.summary() and "CN=browservm test old" in tls.summary()
    soon = load_server_tls(fresh.cert, fresh.key, now=NOW - datetime.timedelta(days=3))
    assert "is not valid before" in soon.warnings[0]


def test_serve_refuses_a_bad_pair_before_anything_is_made(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BROWSERVM_TLS_CERT", "BROWSERVM_TLS_KEY", "BROWSERVM_PUBLIC_URL"):
        monkeypatch.delenv(name, raising=False)
    one, other = make_pair(tmp_path, "one"), make_pair(tmp_path, "other")
    state = tmp_path / "state"

    def serve(*args: str) -> int:
        return main(["serve", "--state-dir", str(state), "--listen", "127.0.0.1:0", *args])

    assert serve("--tls-cert", str(one.cert), "--tls-key", str(other.key)) == 2
    assert capsys.readouterr().err == (f"browservm: error: --tls-key {other.key}: is not the key of the certificate "
                                       f"{one.cert} (its public key differs): give the key the certificate was "
                                       "issued for\n")
    assert not state.exists()  # no lock, no store, no host network: nothing to undo
    assert serve("--tls-cert", str(one.cert)) == 2
    assert "tls_key: --tls-cert needs --tls-key too" in capsys.readouterr().err
    assert serve("--tls-cert", str(one.cert), "--tls-key", str(one.key), "--public-url", "http://vms.example") == 2
    assert "public_url: must be https:// while the controller serves TLS" in capsys.readouterr().err
    monkeypatch.setenv("BROWSERVM_TLS_CERT", str(one.cert))  # the environment, as every setting
    assert serve("--tls-key", str(tmp_path / "absent.key")) == 2
    assert f"--tls-key {tmp_path / 'absent.key'}: does not exist" in capsys.readouterr().err
    assert not state.exists()


def test_settings_base_url_is_https_with_tls_and_a_public_url_must_be_https_too(pair: Pair) -> None:
    settings = load_settings(listen="127.0.0.1:8443", tls_cert=pair.cert, tls_key=pair.key)
    assert settings.base_url == "https://127.0.0.1:8443"
    given = load_settings(tls_cert=pair.cert, tls_key=pair.key, public_url="https://vms.example/")
    assert given.base_url == "https://vms.example"
    with pytest.raises(InvalidInput) as refused:
        load_settings(tls_cert=pair.cert, tls_key=pair.key, public_url="http://vms.example")
    assert refused.value.field == "public_url"
    assert load_settings(public_url="https://vms.example").base_url == "https://vms.example"  # TLS at a proxy
