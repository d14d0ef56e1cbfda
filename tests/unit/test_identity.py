"""The guest's identity daemon, off the guest: what it reads from the config disk, and when it acts
(the steps themselves change a machine's network and clock: they run in real guests only, in
tests/integration/test_restore.py)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from browservm.guest import configdisk
from browservm.guest.identity import Applier, Identity, IdentityError, watch
from browservm.guest.markers import parse_marker

IDENTITY = {"mac": "02:fc:00:00:00:09", "address": "192.168.100.9/24", "gateway": "192.168.100.1",
            "entropy": "ab" * 64, "time": 1_800_000_000.5}


def test_an_identity_is_read_whole_or_refused_with_the_reason() -> None:
    identity = Identity.from_document({"vm_id": "vm-000000000009", "identity": IDENTITY})
    assert identity is not None and str(identity.address) == "192.168.100.9/24" and len(identity.entropy) == 64
    assert Identity.from_document({"vm_id": "vm-1"}) is None  # a cold-booted VM: nothing to take
    with pytest.raises(IdentityError, match="unreadable identity"):
        Identity.from_document({"vm_id": "vm-1", "identity": {**IDENTITY, "address": "not an address"}})
    with pytest.raises(IdentityError, match="less than 32 bytes"):
        Identity.from_document({"vm_id": "vm-1", "identity": {**IDENTITY, "entropy": "ab"}})


class Recording(Applier):
    def __init__(self) -> None:
        super().__init__()
        self.applied: list[str] = []

    def apply(self, identity: Identity, document: dict[str, Any], read_at: float) -> None:
        self.applied.append(identity.vm_id)


def test_a_new_vm_id_on_the_disk_is_applied_once_and_announced(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    disk = tmp_path / "config.img"
    configdisk.write(disk, {"vm_id": "vm-golden"})
    applier, stop, watching = Recording(), threading.Event(), threading.Event()

    def done() -> bool:  # first asked once the daemon has read the disk as it was at its start
        watching.set()
        return stop.is_set()

    watcher = threading.Thread(target=watch, args=(disk, applier, ["xvfb", "websockify"], 0.01, done))
    watcher.start()
    try:
        assert watching.wait(5)
        configdisk.rewrite(disk, {"vm_id": "vm-clone", "identity": IDENTITY})
        for _ in range(500):
            if applier.applied:
                break
            stop.wait(0.01)
        stop.wait(0.1)  # more rounds: the same id is not applied twice
    finally:
        stop.set()
        watcher.join(5)
    assert applier.applied == ["vm-clone"]
    markers = [m for m in map(parse_marker, capsys.readouterr().out.splitlines()) if m]
    assert markers[0] == ("net", {"status": "ok", "device": "eth0", "address": "192.168.100.9/24",
                                  "gateway": "192.168.100.1", "by": "identity"})
    assert markers[-1][1]["service"] == "desktop" and markers[-1][1]["services"] == "xvfb,websockify"
