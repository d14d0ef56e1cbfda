"""FirecrackerDriver's snapshot save and restore, against a fake of Firecracker's API on its socket.

Firecracker needs a KVM host; what runs here is everything up to its API: the driver's requests in
order, each one valid against Firecracker's own specification, the files a snapshot is made of,
the process a restore starts (a stand-in that only waits, in the VM's directory), and failures
reported with Firecracker's own words, the process killed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socketserver
import stat
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from browservm.doctor.vmmview import firecracker_view
from browservm.errors import VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.inotify import wait_for_file
from browservm.vmm import process
from browservm.vmm.driver import FirecrackerDriver
from browservm.vmm.firecracker import JailerOptions, firecracker_restore_argv, write_vm_config
from browservm.vmm.placement import NoCgroup
from browservm.vmm.process import VmmProcess
from browservm.vmm.spec import VmSpec

from .test_firecracker_spec import SPEC_PATH, spec_for, validate_request

pytestmark = pytest.mark.skipif(not SPEC_PATH.exists(), reason=f"Firecracker's API specification not at {SPEC_PATH}")

Call = tuple[str, str, Any]


class FakeFirecracker:
    """Firecracker's API socket as far as the driver goes: records each request's method, path and
    JSON body, answers 204, or 400 with a Firecracker-style `fault_message` for a refused one.

    With `after`, the socket appears only once that file does (the stand-in VMM has started), and
    all at once (bound and listening elsewhere, then renamed): as a real Firecracker's would.
    """

    def __init__(self, socket_path: Path, after: Path | None = None) -> None:
        self.socket_path = socket_path
        self.calls: list[Call] = []
        self.refuse: dict[tuple[str, str], str] = {}
        self._after = after
        self._server: socketserver.UnixStreamServer | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        if self._after is not None and not wait_for_file(self._after, 30):
            return
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fake.calls.append((self.command, self.path, json.loads(raw) if raw else None))
                fault = fake.refuse.get((self.command, self.path))
                payload = b"" if fault is None else json.dumps({"fault_message": fault}).encode()
                self.send_response(204 if fault is None else 400)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_PUT = do_PATCH = answer

            def log_message(self, format: str, *args: Any) -> None:
                pass  # its default reads a client address, which a Unix socket has not

        staged = self.socket_path.with_name(".staged.sock")
        server = socketserver.ThreadingUnixStreamServer(str(staged), Handler)
        os.rename(staged, self.socket_path)
        self._server = server
        server.serve_forever(poll_interval=0.05)  # how soon close() returns

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture
def fakes() -> Iterator[list[FakeFirecracker]]:
    made: list[FakeFirecracker] = []
    try:
        yield made
    finally:
        for fake in made:
            fake.close()


def driver(tmp_path: Path, binary: Path | None = None) -> FirecrackerDriver:
    # As an unprivileged controller: as root, an unjailed Firecracker is refused (test_firecracker_root.py).
    return FirecrackerDriver(binary=str(binary or tmp_path / "firecracker"),
                             placement=NoCgroup("a unit test: placement does not matter"), euid=1000)


def assert_valid(calls: list[Call]) -> None:
    for method, path, body in calls:
        validate_request(method, path, body)


def booted_vm(vm_id: str, directory: Path) -> VmSpec:
    """A VM as FirecrackerDriver.start leaves it: its directory, disks and vm-config.json; the
    kernel and golden image are shared by every VM, beside their directories."""
    directory.mkdir(parents=True)
    images = directory.parent
    spec = dataclasses.replace(spec_for(vm_id, directory), kernel=images / "vmlinux", rootfs=images / "rootfs.ext4")
    for path in (spec.overlay, spec.config_disk):
        assert path is not None
        path.write_bytes(b"disk")
    write_vm_config(spec)
    return spec


# --- save -------------------------------------------------------------------------------------------

def test_save_pauses_and_writes_a_full_snapshot_whose_files_share_its_directory(
        tmp_path: Path, fakes: list[FakeFirecracker]) -> None:
    spec = booted_vm("vm-snap", tmp_path / "vm-snap")
    fakes.append(fake := FakeFirecracker(spec.control_socket))
    assert wait_for_file(spec.control_socket, 10)
    staged = tmp_path / "snapshots" / ".key.staged"
    staged.mkdir(parents=True)

    driver(tmp_path).save(spec, staged / "state")

    assert fake.calls == [
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": str(staged / "state"),
                                     "mem_file_path": str(staged / "state.mem")}),
    ]  # and nothing after: the VM is left paused
    assert_valid(fake.calls)
    assert sorted(p.name for p in staged.iterdir()) == ["state", "state.mem", "state.vm-config.json"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in staged.iterdir()} == {0o600}
    recorded = json.loads((staged / "state.vm-config.json").read_text())
    assert recorded["network-interfaces"][0]["iface_id"] == spec.tap


def test_a_refused_save_says_what_firecracker_said(tmp_path: Path, fakes: list[FakeFirecracker]) -> None:
    spec = booted_vm("vm-snap", tmp_path / "vm-snap")
    fakes.append(fake := FakeFirecracker(spec.control_socket))
    assert wait_for_file(spec.control_socket, 10)
    fault = "Cannot perform open on the memory backing file: No space left on device (os error 28)"
    fake.refuse[("PUT", "/snapshot/create")] = fault
    with pytest.raises(VmmError) as raised:
        driver(tmp_path).save(spec, tmp_path / "state")
    assert (raised.value.vm_id, raised.value.step) == ("vm-snap", "save")
    assert raised.value.reason == f"API PUT /snapshot/create: HTTP 400: {fault}"
    assert not (tmp_path / "state.vm-config.json").exists()


def test_save_never_overwrites_a_snapshot_nor_touches_the_vm_then(
        tmp_path: Path, fakes: list[FakeFirecracker]) -> None:
    spec = booted_vm("vm-snap", tmp_path / "vm-snap")
    fakes.append(fake := FakeFirecracker(spec.control_socket))
    assert wait_for_file(spec.control_socket, 10)
    (tmp_path / "state.mem").write_bytes(b"another snapshot's memory")
    with pytest.raises(VmmError, match=r"state\.mem: File exists"):
        driver(tmp_path).save(spec, tmp_path / "state")
    assert fake.calls == []
    assert (tmp_path / "state.mem").read_bytes() == b"another snapshot's memory"


# --- restore ----------------------------------------------------------------------------------------

def stand_in_firecracker(tmp_path: Path) -> tuple[Path, Path]:
    """An executable that, started as Firecracker, says who it is (PID and start time, in a file
    that appears whole) and waits for a signal: the process a restore starts and must kill."""
    started = tmp_path / "started"
    script = tmp_path / "firecracker"
    script.write_text(f"""#!{sys.executable}
import os, signal
stat = open("/proc/self/stat").read()
with open({str(started)!r} + ".tmp", "w") as out:
    out.write(f"{{os.getpid()}} {{stat[stat.rindex(')') + 2:].split()[19]}}")
os.rename({str(started)!r} + ".tmp", {str(started)!r})
signal.pause()
""")
    script.chmod(0o755)
    return script, started


def started_process(started: Path) -> VmmProcess:
    pid, start_time = started.read_text().split()
    return VmmProcess(int(pid), int(start_time))


def snapshot_of(tmp_path: Path) -> Path:
    """A snapshot as save leaves it, of a VM that was in its own directory (gone now)."""
    made_from = booted_vm("vm-snap", tmp_path / "vm-snap")
    snapshot = tmp_path / "snapshots" / "key"
    snapshot.mkdir(parents=True)
    for name in ("state", "state.mem"):
        (snapshot / name).write_bytes(b"from Firecracker")
    (snapshot / "state.vm-config.json").write_bytes((made_from.directory / "vm-config.json").read_bytes())
    return snapshot / "state"


@pytest.fixture
def killed() -> Iterator[list[Path]]:
    """`started` files of stand-in VMMs: whatever still runs is killed after the test."""
    files: list[Path] = []
    try:
        yield files
    finally:
        for started in files:
            if started.exists():
                vmm = started_process(started)
                process.signal_process(vmm, signal.SIGKILL)
                process.wait_exit(vmm, 10)


def test_restore_loads_the_snapshot_with_this_vms_tap_and_disks_then_resumes(
        tmp_path: Path, fakes: list[FakeFirecracker], killed: list[Path]) -> None:
    state = snapshot_of(tmp_path)
    spec = booted_vm("vm-clone", tmp_path / "vm-clone")
    binary, started = stand_in_firecracker(tmp_path)
    killed.append(started)
    fakes.append(fake := FakeFirecracker(spec.control_socket, after=started))

    vmm = driver(tmp_path, binary).restore(spec, NetworkNamespace(None),
                                          state, lambda: fake.calls.append(("before_resume", "", None)))

    snapshot_tap = json.loads(state.with_name("state.vm-config.json").read_text())["network-interfaces"][0]["iface_id"]
    assert snapshot_tap != spec.tap  # the TAP of the VM the snapshot was taken of
    assert fake.calls == [
        ("PUT", "/logger", {"log_path": str(spec.vmm_log), "level": "Info", "show_level": True}),
        ("PUT", "/snapshot/load", {"snapshot_path": str(state),
                                   "mem_backend": {"backend_type": "File", "backend_path": f"{state}.mem"},
                                   "resume_vm": False,
                                   "network_overrides": [{"iface_id": snapshot_tap, "host_dev_name": spec.tap}]}),
        ("before_resume", "", None),
        ("PATCH", "/vm", {"state": "Resumed"}),
    ]
    assert_valid([call for call in fake.calls if call[0] != "before_resume"])
    assert vmm == started_process(started) and process.alive(vmm)
    cmdline = Path(f"/proc/{vmm.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    assert cmdline[1:] == firecracker_restore_argv(spec, str(binary))  # no --config-file
    # The snapshot's drives are relative paths: they resolve in the clone's own directory.
    assert Path(os.readlink(f"/proc/{vmm.pid}/cwd")) == spec.directory
    # What the doctor reads of the clone: its own TAP and MAC, as for a cold-booted VM.
    view = firecracker_view(json.loads((spec.directory / "vm-config.json").read_text()), "vm-config.json")
    assert (view.tap, view.iface_id, view.mac) == (spec.tap, spec.tap, spec.mac)


def test_a_refused_load_kills_the_vmm_and_says_what_firecracker_said(
        tmp_path: Path, fakes: list[FakeFirecracker], killed: list[Path]) -> None:
    state = snapshot_of(tmp_path)
    spec = booted_vm("vm-clone", tmp_path / "vm-clone")
    binary, started = stand_in_firecracker(tmp_path)
    killed.append(started)
    fakes.append(fake := FakeFirecracker(spec.control_socket, after=started))
    fault = "Load snapshot error: Failed to restore from snapshot: Failed to build microVM from snapshot"
    fake.refuse[("PUT", "/snapshot/load")] = fault
    resumed: list[bool] = []

    with pytest.raises(VmmError) as raised:
        driver(tmp_path, binary).restore(spec, NetworkNamespace(None), state, lambda: resumed.append(True))

    assert (raised.value.vm_id, raised.value.step) == ("vm-clone", "restore")
    assert raised.value.reason == f"API PUT /snapshot/load: HTTP 400: {fault}"
    assert not process.alive(started_process(started))
    assert resumed == [] and [path for _, path, _ in fake.calls] == ["/logger", "/snapshot/load"]


def test_a_failure_before_resuming_kills_the_vmm_and_never_resumes_it(
        tmp_path: Path, fakes: list[FakeFirecracker], killed: list[Path]) -> None:
    state = snapshot_of(tmp_path)
    spec = booted_vm("vm-clone", tmp_path / "vm-clone")
    binary, started = stand_in_firecracker(tmp_path)
    killed.append(started)
    fakes.append(fake := FakeFirecracker(spec.control_socket, after=started))

    def before_resume() -> None:
        raise PermissionError(13, "Permission denied", str(spec.config_disk))

    with pytest.raises(VmmError, match=r"restore: before resuming: .*Permission denied"):
        driver(tmp_path, binary).restore(spec, NetworkNamespace(None), state, before_resume)
    assert not process.alive(started_process(started))
    assert ("PATCH", "/vm", {"state": "Resumed"}) not in fake.calls


def test_a_snapshot_whose_drives_are_not_this_vms_is_refused_before_anything_starts(tmp_path: Path) -> None:
    state = snapshot_of(tmp_path)
    recorded = json.loads(state.with_name("state.vm-config.json").read_text())
    recorded["drives"][1]["path_on_host"] = str(tmp_path / "vm-snap" / "overlay.ext4")  # the VM's, by full path
    state.with_name("state.vm-config.json").write_text(json.dumps(recorded))
    spec = booted_vm("vm-clone", tmp_path / "vm-clone")
    binary, started = stand_in_firecracker(tmp_path)

    with pytest.raises(VmmError, match="would open other disks than this VM's") as raised:
        driver(tmp_path, binary).restore(spec, NetworkNamespace(None), state, lambda: None)
    assert raised.value.step == "restore"
    assert not started.exists()  # nothing was started


def test_a_state_without_its_config_is_not_a_firecracker_snapshot(tmp_path: Path) -> None:
    state = snapshot_of(tmp_path)
    state.with_name("state.vm-config.json").unlink()
    spec = booted_vm("vm-clone", tmp_path / "vm-clone")
    with pytest.raises(VmmError, match="not a Firecracker snapshot"):
        driver(tmp_path).restore(spec, NetworkNamespace(None), state, lambda: None)


# --- what a snapshot depends on, and the jailer -------------------------------------------------------

def test_snapshot_inputs_are_the_binary_and_the_machine_never_a_vms_own_values(tmp_path: Path) -> None:
    binary = tmp_path / "firecracker"
    binary.write_bytes(b"firecracker v1")
    one = booted_vm("vm-one", tmp_path / "vm-one")
    two = booted_vm("vm-two", tmp_path / "vm-two")
    inputs = driver(tmp_path).snapshot_inputs(one)
    assert inputs == driver(tmp_path).snapshot_inputs(two)  # other id, TAP, MAC, directory, address
    size, mtime = binary.stat().st_size, binary.stat().st_mtime_ns
    assert inputs["vmm"] == f"{binary} {size} {mtime}"
    machine = json.loads(inputs["devices"])
    assert machine["machine-config"] == {"vcpu_count": 2, "mem_size_mib": 1024, "smt": False}
    assert [d["path_on_host"] for d in machine["drives"]][1:] == ["overlay.ext4", "config.img"]
    assert "vm-one" not in inputs["devices"] and one.tap not in inputs["devices"]

    assert driver(tmp_path).snapshot_inputs(dataclasses.replace(one, vcpus=1)) != inputs
    binary.write_bytes(b"firecracker v2, a rebuild")
    assert driver(tmp_path).snapshot_inputs(one)["vmm"] != inputs["vmm"]


def test_under_the_jailer_snapshots_are_refused_with_the_reason(tmp_path: Path) -> None:
    spec = booted_vm("vm-abc", tmp_path / "vm-abc")
    jailed = FirecrackerDriver(binary=str(tmp_path / "firecracker"), placement=NoCgroup("a unit test"),
                               jailer=JailerOptions(uid=os.getuid(), gid=os.getgid(), chroot_base=tmp_path / "jail"))
    for attempt in (lambda: jailed.snapshot_inputs(spec), lambda: jailed.save(spec, tmp_path / "state"),
                    lambda: jailed.restore(spec, NetworkNamespace(None), tmp_path / "state", lambda: None)):
        with pytest.raises(VmmError, match="snapshot restore under the jailer is not built yet"):
            attempt()
