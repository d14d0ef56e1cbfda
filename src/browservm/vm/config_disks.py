"""What the controller writes onto a VM's config disk (guest/configdisk.py), and reads back.

Per-VM secrets are made at a VM's start and travel to the guest on its config disk only: the
agent's key and the desktop's VNC password. A restored VM's disk also carries the identity it
takes when it resumes (its MAC, address, entropy and the clock).
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from pathlib import Path

from browservm.errors import VmmError
from browservm.guest import configdisk
from browservm.rfb import vnc_password_file
from browservm.vm.records import VmRecord


def new_secrets() -> dict[str, str]:
    """Per-VM secrets, made at its start and carried to the guest on its config disk only."""
    # VNC passwords: 8 characters (all RFB's DES key holds), letters and digits only, which x11vnc's
    # password file reads literally. Xvnc reads vncpasswd's format instead (DES, which the guest's
    # standard library lacks): its bytes travel beside the password, made here.
    vnc = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))
    return {"agent": secrets.token_hex(32), "vnc": vnc, "vnc_file": vnc_password_file(vnc).hex()}


def write_cold(path: Path, vm_id: str) -> None:
    """A cold-booted VM's disk: its id and new secrets. Blocking."""
    configdisk.write(path, {"vm_id": vm_id, "secrets": new_secrets()})


def write_restored(path: Path, record: VmRecord) -> Callable[[], None]:
    """A restored VM's disk: its id, new secrets and the identity it takes on resuming. Blocking.
    Returns what to run just before the VM resumes (the disk rewritten with the clock of that moment)."""
    identity: dict[str, object] = {"mac": record.mac, "address": record.address, "gateway": record.gateway,
                                   "entropy": secrets.token_hex(64), "time": time.time()}
    document = {"vm_id": record.vm_id, "secrets": new_secrets(), "identity": identity}
    configdisk.write(path, document)

    def before_resume() -> None:
        # The clock the guest steps to: the host's, as close as can be to the moment it resumes.
        identity["time"] = time.time()
        configdisk.rewrite(path, document)
    return before_resume


def new_agent_key(path: Path, vm_id: str) -> None:
    """Give the VM's agent a new key (a pooled VM's claim): the agent checks each request against the
    disk's key, so the new key works at once and the old one stops. Blocking."""
    try:
        document = configdisk.read(path)
        document.setdefault("secrets", {})["agent"] = new_secrets()["agent"]
        configdisk.rewrite(path, document)
    except (OSError, configdisk.ConfigDiskError) as exc:
        raise VmmError(vm_id, "new agent key", f"{path}: {exc}") from exc


def read_secrets(path: Path, vm_id: str) -> dict[str, str]:
    """The secrets the VM's config disk carries (the agent's key, the desktop's password). Blocking."""
    try:
        document = configdisk.read(path)
    except (OSError, configdisk.ConfigDiskError) as exc:
        raise VmmError(vm_id, "read config disk", str(exc)) from exc
    found: dict[str, str] = document.get("secrets", {})
    return found
