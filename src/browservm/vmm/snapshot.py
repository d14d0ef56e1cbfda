"""Saving a running QEMU's whole state to a file, and starting another QEMU from it.

The state travels as a migration stream through a file descriptor the controller opens and
hands over on the QMP socket (`getfd`): QEMU itself opens nothing (it runs as the VM's uid under
a seccomp filter that forbids spawning `exec:` helpers), and the file stays the controller's.

    save     link down, stop, migrate to fd      -> the VM stays paused, its disk consistent
    restore  QEMU started with `-incoming defer -S` and the same devices; migrate-incoming from
             fd; link held down; `before_resume()` (the host writes the clone's identity and
             clock onto its config disk); cont  -> the guest runs, offline until `link_up`
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from browservm.errors import VmmError
from browservm.inotify import wait_for_file
from browservm.vmm.qmp import Qmp, QmpError

NIC = "net0"  # the netdev/NIC id qemu_argv gives the VM's network card
_FD_NAME = "browservm-state"
_BANDWIDTH = 64 * 2**30  # bytes/s: QEMU's default (32 MiB/s) would make a 1 GiB save take half a minute
_TERMINAL = ("completed", "failed", "cancelled")


def _migrated(qmp: Qmp, timeout: float) -> None:
    while True:
        status = qmp.wait_event("MIGRATION", timeout)["data"]["status"]
        if status in _TERMINAL:
            if status != "completed":
                said = qmp.execute("query-migrate").get("error-desc", "no reason given")
                raise QmpError(f"the migration stream {status}: {said}")
            return


def _prepare(qmp: Qmp) -> None:
    qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})


def save_state(vm_id: str, control_socket: Path, target: Path, timeout: float = 120.0) -> None:
    """Write the running VM's state to `target` (a new file, 0600); the VM is left paused."""
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VmmError(vm_id, "save", f"{target}: {exc.strerror}") from exc
    try:
        with Qmp(control_socket) as qmp:
            qmp.execute("set_link", {"name": NIC, "up": False})  # clones wake offline
            qmp.execute("stop")
            _prepare(qmp)
            qmp.execute("migrate-set-parameters", {"max-bandwidth": _BANDWIDTH})
            qmp.execute("getfd", {"fdname": _FD_NAME}, fds=(fd,))
            qmp.execute("migrate", {"uri": f"fd:{_FD_NAME}"})
            _migrated(qmp, timeout)
        os.fsync(fd)
    except (QmpError, OSError) as exc:
        raise VmmError(vm_id, "save", str(exc)) from exc
    finally:
        os.close(fd)


def restore_state(vm_id: str, control_socket: Path, source: Path, before_resume: Callable[[], None],
                  timeout: float = 120.0) -> None:
    """Load `source` into a QEMU started with `-incoming defer -S`, then resume it with its link down."""
    if not wait_for_file(control_socket, timeout):
        raise VmmError(vm_id, "restore", f"QEMU made no control socket within {timeout:g} s (see vmm.log)")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(vm_id, "restore", f"{source}: {exc.strerror}") from exc
    try:
        with Qmp(control_socket) as qmp:
            _prepare(qmp)
            qmp.execute("getfd", {"fdname": _FD_NAME}, fds=(fd,))
            qmp.execute("migrate-incoming", {"uri": f"fd:{_FD_NAME}"})
            _migrated(qmp, timeout)
            qmp.execute("set_link", {"name": NIC, "up": False})
            before_resume()
            qmp.execute("cont")
    except (QmpError, OSError) as exc:
        raise VmmError(vm_id, "restore", str(exc)) from exc
    finally:
        os.close(fd)


def link_up(vm_id: str, control_socket: Path) -> None:
    """Connect the restored VM to its bridge, once it has taken its own identity."""
    try:
        with Qmp(control_socket) as qmp:
            qmp.execute("set_link", {"name": NIC, "up": True})
    except (QmpError, OSError) as exc:
        raise VmmError(vm_id, "link up", str(exc)) from exc
