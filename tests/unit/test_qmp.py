"""Qmp's connection to a QEMU control socket that exists before it listens (QEMU binds, then listens)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from browservm.vmm.qmp import Qmp


def _speak_qmp(server: socket.socket, listening: threading.Event) -> None:
    """Listen once `listening` is set, then greet one client and answer its qmp_capabilities."""
    listening.wait(10)
    server.listen(1)
    connection, _ = server.accept()
    with connection:
        connection.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\n")
        if json.loads(connection.recv(65536))["execute"] == "qmp_capabilities":  # QMP's client sends no newline
            connection.sendall(b'{"return": {}}\n')


def test_a_socket_bound_but_not_yet_listening_is_waited_for_until_it_listens(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))  # the file is there: QEMU between bind() and listen()
        listening = threading.Event()
        qemu = threading.Thread(target=_speak_qmp, args=(server, listening))
        qemu.start()
        later = threading.Timer(0.2, listening.set)
        later.start()
        try:
            with Qmp(path, timeout=5.0):
                pass
        finally:
            later.cancel()
            listening.set()
            qemu.join(10)
        assert not qemu.is_alive()


def test_a_socket_that_never_listens_is_refused_at_the_deadline(tmp_path: Path) -> None:
    path = tmp_path / "qmp.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        with pytest.raises(ConnectionRefusedError), Qmp(path, timeout=0.3):
            pass
