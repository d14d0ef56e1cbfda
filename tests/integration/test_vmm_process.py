"""VMM processes against real processes: where spawn puts them, and how they are recognised later.

The "VMMs" are copies of /bin/sleep named qemu-system-x86_64: what identifies a VMM is its
executable, its working directory (or its root, when jailed) and its start time, and a
renamed sleep has all of those without booting anything.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from browservm.errors import VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.vmm import process
from browservm.vmm.placement import (
    OwnCgroup,
    Placement,
    ResourceLimits,
    SystemdScope,
    choose_placement,
    systemd_is_init,
)
from browservm.vmm.process import VmmProcess, is_vmm_of, owned_vmms, spawn

from .conftest import Namespaces

pytestmark = pytest.mark.host


class Processes:
    """Starts test processes and kills every one of them (by PID, its own) at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self.spawned: list[VmmProcess] = []

    def start(self, argv: list[str], cwd: Path) -> VmmProcess:
        child = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.started.append(child)
        start = process.start_time(child.pid)
        assert start is not None
        return VmmProcess(child.pid, start)

    def cleanup(self) -> None:
        for child in self.started:
            child.kill()
            child.wait(timeout=10)
        for vmm in self.spawned:
            process.signal_process(vmm, signal.SIGKILL)
            assert process.wait_exit(vmm, 10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    try:
        yield started
    finally:
        started.cleanup()


def stand_in(folder: Path, name: str = "qemu-system-x86_64") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    binary = folder / name
    shutil.copy2("/bin/sleep", binary)
    return binary


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_only_the_vmms_of_this_state_directory_are_found_not_lookalikes(tmp_path: Path,
                                                                          processes: Processes) -> None:
    vm_root = tmp_path / "state" / "vms"
    vm_a, vm_b = vm_root / "vm-a", vm_root / "vm-b"
    other_vm = tmp_path / "other-state" / "vms" / "vm-a"  # another deployment, even the same VM id
    jail_base = tmp_path / "state" / "jail"
    jail = jail_base / "firecracker" / "vm-j" / "root"
    elsewhere = tmp_path / "elsewhere"
    for folder in (vm_a, vm_b, other_vm, jail, elsewhere):
        folder.mkdir(parents=True)
    qemu = stand_in(tmp_path / "bin")

    vmm_a = processes.start([str(qemu), "60"], cwd=vm_a)
    # A VMM whose binary was replaced since it started (an upgrade): /proc/PID/exe says "(deleted)".
    upgraded = stand_in(tmp_path / "old-bin")
    vmm_b = processes.start([str(upgraded), "60"], cwd=vm_b)
    upgraded.unlink()
    jailed = processes.start([sys.executable, "-c", "import os, sys, time; os.chroot(sys.argv[1]); os.chdir('/'); "
                              "time.sleep(60)", str(jail)], cwd=elsewhere)
    wait_for(lambda: os.readlink(f"/proc/{jailed.pid}/root") == str(jail), "the jailed stand-in chrooted")

    # Lookalikes: every command-line word of a VMM but another program; an operator in a VM
    # directory; a VMM binary that stands in the VM root itself; another deployment's VMM.
    decoy = processes.start([sys.executable, "-c", "import time; time.sleep(60)", "firecracker", "--id", "vm-a",
                             "--api-sock", str(vm_a / "control.sock"), "qemu-system-x86_64", str(vm_a)],
                            cwd=elsewhere)
    operator = processes.start(["sleep", "60"], cwd=vm_a)
    in_root = processes.start([str(qemu), "60"], cwd=vm_root)
    other = processes.start([str(qemu), "60"], cwd=other_vm)

    assert owned_vmms(vm_root, jail_base) == {vmm_a: "vm-a", vmm_b: "vm-b", jailed: "vm-j"}
    assert owned_vmms(vm_root) == {vmm_a: "vm-a", vmm_b: "vm-b"}
    assert owned_vmms(other_vm.parent) == {other: "vm-a"}
    # Through a symbolic link to the state directory: the kernel reports real paths.
    (tmp_path / "link").symlink_to(tmp_path / "state")
    assert owned_vmms(tmp_path / "link" / "vms", tmp_path / "link" / "jail") == owned_vmms(vm_root, jail_base)

    assert is_vmm_of(vmm_a, vm_a) and is_vmm_of(vmm_b, vm_b)
    assert is_vmm_of(vmm_a, tmp_path / "link" / "vms" / "vm-a")
    assert not is_vmm_of(vmm_a, vm_b)
    assert not is_vmm_of(other, vm_a) and is_vmm_of(other, other_vm)
    assert is_vmm_of(jailed, vm_root / "vm-j", jail) and not is_vmm_of(jailed, vm_root / "vm-j")
    assert not is_vmm_of(jailed, vm_root / "vm-j", jail_base / "firecracker" / "vm-k" / "root")
    for lookalike in (decoy, operator, in_root):
        assert not is_vmm_of(lookalike, vm_a), lookalike
    # The same PID with another start time is another process.
    assert not is_vmm_of(VmmProcess(vmm_a.pid, vmm_a.start_time + 1), vm_a)
    os.kill(vmm_a.pid, signal.SIGKILL)
    assert process.wait_exit(vmm_a, 10)
    assert not is_vmm_of(vmm_a, vm_a)
    assert owned_vmms(vm_root, jail_base) == {vmm_b: "vm-b", jailed: "vm-j"}


@pytest.fixture
def own_cgroup() -> OwnCgroup:
    chosen = choose_placement()
    if not isinstance(chosen, OwnCgroup):
        pytest.skip(f"needs a writable cgroup v2 hierarchy and no systemd as PID 1: {chosen.reason}")
    return chosen


class Spawner:
    """spawn() for one test: a VM directory per VM id, and every cgroup released at the end."""

    def __init__(self, tmp_path: Path, placement: Placement, processes: Processes) -> None:
        self.vm_root = tmp_path / "vms"
        self.placement = placement
        self.processes = processes
        self.vm_ids: list[str] = []

    def directory(self, vm_id: str) -> Path:
        directory = self.vm_root / vm_id
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def spawn(self, argv: list[str], name: str, netns: NetworkNamespace | None = None,
              directory: Path | None = None, log: Path | None = None,
              limits: ResourceLimits | None = None) -> tuple[str, VmmProcess]:
        vm_id = f"bvt-{os.getpid()}-{name}"
        self.vm_ids.append(vm_id)
        where = directory or self.directory(vm_id)
        vmm = spawn(argv, log or where / "vmm.log", netns or NetworkNamespace(None), vm_id, directory=where,
                    placement=self.placement, limits=limits)
        self.processes.spawned.append(vmm)
        return vm_id, vmm

    def cleanup(self) -> None:
        for vm_id in self.vm_ids:
            self.placement.release(vm_id)


@pytest.fixture
def spawner(tmp_path: Path, own_cgroup: OwnCgroup, processes: Processes) -> Iterator[Spawner]:
    made = Spawner(tmp_path, own_cgroup, processes)
    try:
        yield made
    finally:
        made.cleanup()


def _cgroup(pid: int | str) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line for line in lines if line.startswith("0::")).removeprefix("0::")


def test_spawn_starts_the_vmm_in_its_own_cgroup_directory_session_and_namespace_not_as_our_child(
        tmp_path: Path, spawner: Spawner, own_cgroup: OwnCgroup, namespaces: Namespaces,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # As under systemd, where the controller's environment carries its keys (/etc/default/browservm).
    monkeypatch.setenv("BROWSERVM_API_KEY", "api-key-of-the-controller")
    monkeypatch.setenv("BROWSERVM_VAULT_KEY", "vault-key-of-the-controller")
    netns = namespaces.create("vmm")
    qemu = stand_in(tmp_path / "bin")
    vm_id, vmm = spawner.spawn([str(qemu), "60"], "own", NetworkNamespace(netns))

    cgroup = own_cgroup.cgroup(vm_id)
    assert _cgroup(vmm.pid) == f"/{cgroup.relative_to(own_cgroup.root)}" != _cgroup("self")
    assert (cgroup / "cgroup.procs").read_text().split() == [str(vmm.pid)]
    assert os.readlink(f"/proc/{vmm.pid}/cwd") == str(spawner.vm_root / vm_id)
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{vmm.pid}/status").read_text().splitlines())
    assert int(status["PPid"]) != os.getpid()
    assert os.getsid(vmm.pid) != os.getsid(0) and os.getpgid(vmm.pid) != os.getpgid(0)
    assert os.stat(f"/proc/{vmm.pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    assert os.readlink(f"/proc/{vmm.pid}/fd/0") == "/dev/null"
    # Its environment is the fixed one, nothing of ours (issue 18: the keys were in every VMM's).
    environ = Path(f"/proc/{vmm.pid}/environ").read_bytes()
    assert dict(entry.split(b"=", 1) for entry in environ.split(b"\0") if entry) == {
        os.fsencode(name): os.fsencode(value) for name, value in process.VMM_ENVIRONMENT.items()}
    assert b"controller" not in environ
    assert os.readlink(f"/proc/{vmm.pid}/fd/1") == os.readlink(f"/proc/{vmm.pid}/fd/2") == str(
        spawner.vm_root / vm_id / "vmm.log")
    # Nothing else of ours leaked (once the dynamic loader, which opens libraries on fd 3, is done).
    wait_for(lambda: sorted(os.listdir(f"/proc/{vmm.pid}/fd")) == ["0", "1", "2"], "only stdin, stdout, stderr")
    assert is_vmm_of(vmm, spawner.vm_root / vm_id)
    assert owned_vmms(spawner.vm_root) == {vmm: vm_id}

    process.signal_process(vmm, signal.SIGKILL)
    assert process.wait_exit(vmm, 10)
    own_cgroup.release(vm_id)
    assert not cgroup.exists()
    own_cgroup.release(vm_id)  # idempotent


def test_the_vms_cgroup_carries_its_limits_where_the_host_delegates_the_controllers(
        tmp_path: Path, spawner: Spawner, own_cgroup: OwnCgroup) -> None:
    limits = ResourceLimits(cpus=1, memory_mib=1536, tasks=257)
    vm_id, _ = spawner.spawn([str(stand_in(tmp_path / "bin")), "60"], "limits", limits=limits)
    cgroup = own_cgroup.cgroup(vm_id)
    if not own_cgroup.enforced:
        # Said, not pretended: `host status` and the doctor show this reason.
        assert "limits are not enforced" in own_cgroup.reason
        pytest.skip(f"this host's cgroup v2 hierarchy delegates none of cpu, memory, pids: {own_cgroup.reason}")
    expected = {"cpu": ("cpu.max", "100000 100000"), "memory": ("memory.max", str(1536 * 2**20)),
                "pids": ("pids.max", "257")}
    for controller in own_cgroup.enforced:
        name, value = expected[controller]
        assert (cgroup / name).read_text().strip() == value


def test_release_ends_what_still_runs_in_the_vms_cgroup(tmp_path: Path, spawner: Spawner,
                                                         own_cgroup: OwnCgroup) -> None:
    qemu = stand_in(tmp_path / "bin")
    vm_id, vmm = spawner.spawn([str(qemu), "60"], "left")
    with pytest.raises(VmmError) as excinfo:  # and a second VM of the same id is refused meanwhile
        own_cgroup.prepare(vm_id)
    assert f"already holds processes [{vmm.pid}]" in excinfo.value.reason
    own_cgroup.release(vm_id)
    assert process.wait_exit(vmm, 5)
    assert not own_cgroup.cgroup(vm_id).exists()


def test_what_the_vmm_prints_goes_to_its_log(spawner: Spawner) -> None:
    vm_id, vmm = spawner.spawn(["sleep", "not-a-number"], "log")
    assert process.wait_exit(vmm, 10)
    assert "invalid time interval" in (spawner.vm_root / vm_id / "vmm.log").read_text()


def test_what_fails_before_or_at_exec_is_a_vmm_error_that_says_what(tmp_path: Path, spawner: Spawner,
                                                                     own_cgroup: OwnCgroup) -> None:
    with pytest.raises(VmmError) as excinfo:
        spawner.spawn(["qemu-system-bvt-missing", "-name", "x"], "missing")
    assert excinfo.value.reason == "cannot run qemu-system-bvt-missing: No such file or directory"
    assert excinfo.value.step == "start"
    assert not own_cgroup.cgroup(excinfo.value.vm_id).exists()  # released on the way out

    not_executable = tmp_path / "qemu-system-noexec"
    not_executable.write_text("")
    with pytest.raises(VmmError) as excinfo:
        spawner.spawn([str(not_executable)], "noexec")
    assert excinfo.value.reason == f"cannot run {not_executable}: Permission denied"

    with pytest.raises(VmmError) as excinfo:
        spawner.spawn(["sleep", "60"], "nodir", directory=tmp_path / "no-such-directory", log=tmp_path / "log")
    assert excinfo.value.reason == f"cannot enter the VM directory {tmp_path / 'no-such-directory'}: " \
                                   "No such file or directory"


class ThroughEnv(OwnCgroup):
    """A placement whose launcher execs the VMM in the same process, as systemd-run does: `env`."""

    def wrap(self, argv: Sequence[str], vm_id: str, limits: ResourceLimits | None = None) -> list[str]:
        return ["env", *argv]


def test_spawn_through_a_launcher_returns_once_the_launcher_has_become_the_vmm(
        tmp_path: Path, own_cgroup: OwnCgroup, processes: Processes) -> None:
    through_env = Spawner(tmp_path, ThroughEnv(own_cgroup.root), processes)
    qemu = stand_in(tmp_path / "bin")
    try:
        vm_id, vmm = through_env.spawn([str(qemu), "60"], "launcher")
        assert os.readlink(f"/proc/{vmm.pid}/exe") == str(qemu)  # not env: spawn waited for the exec
        assert is_vmm_of(vmm, through_env.vm_root / vm_id)

        with pytest.raises(VmmError) as excinfo:  # the launcher fails: said at once, with its last word
            through_env.spawn(["qemu-system-bvt-missing"], "launcher-fails")
        assert excinfo.value.reason.startswith("env exited before it ran qemu-system-bvt-missing: env: ")
        assert "No such file or directory" in excinfo.value.reason
    finally:
        through_env.cleanup()


@pytest.mark.skipif(not systemd_is_init(), reason=(
    "systemd is not PID 1 here (PID 1 is "
    f"{Path('/proc/1/comm').read_text().strip() if Path('/proc/1/comm').exists() else 'unknown'}), so no "
    "transient scope can be made; the systemd-run command is tested as a value in tests/unit/test_placement.py"))
def test_under_systemd_the_vmm_runs_in_a_transient_scope_of_its_own(tmp_path: Path, processes: Processes) -> None:
    scope = SystemdScope()
    spawned = Spawner(tmp_path, scope, processes)
    qemu = stand_in(tmp_path / "bin")
    try:
        vm_id, vmm = spawned.spawn([str(qemu), "60"], "scope")
        assert _cgroup(vmm.pid).endswith(f"/browservm.slice/browservm-{vm_id}.scope")
        assert is_vmm_of(vmm, spawned.vm_root / vm_id)  # systemd-run exec'd the VMM: same PID
        scope.release(vm_id)
        assert process.wait_exit(vmm, 30)
    finally:
        spawned.cleanup()
