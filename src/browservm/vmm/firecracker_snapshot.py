"""Saving a running Firecracker's whole state to files, and starting another Firecracker from them.

Firecracker's snapshot API writes and reads files by path, so a snapshot is three files side by
side, all in the snapshot's directory (the manager's store publishes and removes it as one):

    <target>                  the microVM state (/snapshot/create `snapshot_path`): the state file
    <target>.mem              the guest memory, a Full snapshot; each clone maps it privately, so
                              it must never change while the snapshot exists
    <target>.vm-config.json   the config the VM was started with: the drive paths and the
                              interface id its state refers to

    save     pause, /snapshot/create  -> the VM stays paused, its disk consistent
    restore  Firecracker with only --api-sock; logger; /snapshot/load with the memory file and this
             VM's TAP under the snapshot's interface, not resumed; `before_resume()` (the host
             writes the clone's identity and clock onto its config disk); resume

Drives: /snapshot/load reopens each drive at the path recorded in the state, before any request
could change it, so the drives are given relative to the VM's directory, which is Firecracker's
working directory (firecracker.in_vm_directory): the clone opens its own disks in its own
directory. A restore checks the snapshot's drive paths are this VM's before it starts anything.

Interface: `iface_id` is the TAP name of the VM the snapshot was taken of (firecracker_config);
`network_overrides` gives that interface this VM's TAP as its `host_dev_name`, so the clone is
attached to its own TAP and never to the (gone, or worse, reused) TAP of the snapshot's VM.

Link: QEMU's save sets the NIC's link down so clones wake offline; Firecracker has no link
control (its virtio-net offers the guest no link status), so the restored VM's TAP has to be held
down on the host from before the resume until the guest has taken its identity. That is the
host network's part, done by the manager; FirecrackerDriver.link_up has nothing to do.

Clock: kvmclock resumes where it stood at the snapshot, as under QEMU. /snapshot/load's
`clock_realtime` would instead advance it by the whole time since the snapshot (days, for an old
one), CLOCK_MONOTONIC with it, firing every timer the desktop holds at once; the guest's identity
service steps the wall clock from the config disk before its link comes up anyway.

The jailer is not supported here (FirecrackerDriver says why).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from browservm.errors import VmmError
from browservm.inotify import wait_for_file
from browservm.vmdir import VM_CONFIG
from browservm.vmm.firecracker import FirecrackerApi, firecracker_config, in_vm_directory, logger_config
from browservm.vmm.spec import VmSpec

_TIMEOUT = 120.0  # s: writing 1 GiB of guest memory to disk, or a slow disk under load
_SOCKET_TIMEOUT = 30.0  # s: Firecracker makes its API socket within milliseconds of starting


def memory_file(state: Path) -> Path:
    """The guest memory file of the snapshot whose state file is `state`: `<state>.mem`."""
    return state.with_name(state.name + ".mem")


def config_file(state: Path) -> Path:
    """The config the snapshot's VM was started with: `<state>.vm-config.json`."""
    return state.with_name(f"{state.name}.{VM_CONFIG}")


# --- request bodies (values: validated against Firecracker's API specification in the tests) ---

def vm_state_request(state: str) -> dict[str, str]:
    """PATCH /vm: "Paused" or "Resumed"."""
    return {"state": state}


def snapshot_create_request(state: Path, memory: Path) -> dict[str, str]:
    """PUT /snapshot/create: a Full snapshot (a Diff one would need the memory of a previous one)."""
    return {"snapshot_type": "Full", "snapshot_path": str(state), "mem_file_path": str(memory)}


def snapshot_load_request(state: Path, memory: Path, taps: dict[str, str]) -> dict[str, Any]:
    """PUT /snapshot/load, left paused: the memory file mapped from disk, and `taps` (the snapshot's
    iface_id -> this VM's TAP) as the interfaces' host devices. `clock_realtime` is left unset (see
    the module's docstring)."""
    return {
        "snapshot_path": str(state),
        "mem_backend": {"backend_type": "File", "backend_path": str(memory)},
        "resume_vm": False,
        "network_overrides": [{"iface_id": iface_id, "host_dev_name": tap} for iface_id, tap in taps.items()],
    }


def restore_taps(vm_id: str, snapshot_config: dict[str, Any], spec: VmSpec) -> dict[str, str]:
    """The snapshot's interface -> this VM's TAP, once the snapshot's drives are found to be this
    VM's disks (the same paths, relative to each VM's directory, and the same shared image)."""
    own = firecracker_config(in_vm_directory(spec))
    theirs = {d.get("drive_id"): d.get("path_on_host") for d in snapshot_config.get("drives", [])}
    mine = {d["drive_id"]: d["path_on_host"] for d in own["drives"]}
    if theirs != mine:
        raise VmmError(vm_id, "restore", f"the snapshot's drives are {theirs}, this VM's are {mine}: its state "
                                         "would open other disks than this VM's")
    interfaces = snapshot_config.get("network-interfaces", [])
    if len(interfaces) != 1 or not isinstance(interfaces[0].get("iface_id"), str):
        raise VmmError(vm_id, "restore", f"the snapshot's VM had network interfaces {interfaces}; "
                                         "a VM has exactly one")
    return {interfaces[0]["iface_id"]: spec.tap}


# --- the sequences --------------------------------------------------------------------------------

def save_state(vm_id: str, api_socket: Path, vm_config: Path, target: Path, timeout: float = _TIMEOUT) -> None:
    """Pause the VM and write its snapshot to `target` and beside it; the VM is left paused.

    Its link is not touched: Firecracker has none to set, the clone's TAP is held down instead.
    """
    memory, recorded = memory_file(target), config_file(target)
    try:
        config = vm_config.read_bytes()
        # New files, 0600, never an existing snapshot's: Firecracker truncates and fills them.
        for path in (target, memory):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise VmmError(vm_id, "save", f"{exc.filename}: {exc.strerror}") from exc
    api = _Api(vm_id, "save", api_socket, timeout)
    api.request("PATCH", "/vm", vm_state_request("Paused"))
    api.request("PUT", "/snapshot/create", snapshot_create_request(target, memory))
    _write_new(vm_id, recorded, config)


def read_snapshot_config(vm_id: str, state: Path) -> dict[str, Any]:
    path = config_file(state)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise VmmError(vm_id, "restore", f"{path}: {exc.strerror} (not a Firecracker snapshot?)") from exc
    except ValueError as exc:
        raise VmmError(vm_id, "restore", f"{path}: {exc}") from exc
    if not isinstance(document, dict):
        raise VmmError(vm_id, "restore", f"{path} is not a JSON object")
    return document


def restore_state(spec: VmSpec, state: Path, taps: dict[str, str], before_resume: Callable[[], None],
                  timeout: float = _TIMEOUT) -> None:
    """Load `state` into a Firecracker just started with only its API socket, then resume it."""
    if not wait_for_file(spec.control_socket, _SOCKET_TIMEOUT):
        raise VmmError(spec.vm_id, "restore", f"Firecracker made no API socket within {_SOCKET_TIMEOUT:g} s "
                                              f"(see {spec.console_log.name})")
    api = _Api(spec.vm_id, "restore", spec.control_socket, timeout)
    api.request("PUT", "/logger", logger_config(spec))
    api.request("PUT", "/snapshot/load", snapshot_load_request(state, memory_file(state), taps))
    try:
        before_resume()
    except OSError as exc:
        raise VmmError(spec.vm_id, "restore", f"before resuming: {exc}") from exc
    api.request("PATCH", "/vm", vm_state_request("Resumed"))


class _Api(FirecrackerApi):
    """Requests made as one step of the VM's life: a refusal is that step's failure, in Firecracker's
    own words (its `fault_message`)."""

    def __init__(self, vm_id: str, step: str, socket_path: Path, timeout: float) -> None:
        super().__init__(vm_id, socket_path, timeout)
        self._step = step

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            return super().request(method, path, body)
        except VmmError as exc:
            raise VmmError(exc.vm_id, self._step, f"{exc.step}: {exc.reason}") from exc


def _write_new(vm_id: str, path: Path, content: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise VmmError(vm_id, "save", f"{path}: {exc.strerror}") from exc
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as exc:
        raise VmmError(vm_id, "save", f"{path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
