"""Where VMMs live, as values: the systemd-run command, the cgroup v2 mount, the choice, the unit file.

The live paths (a real cgroup, a real scope) are in tests/integration/test_vmm_process.py.
"""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

import pytest

import browservm
from browservm.errors import InvalidVmId, VmmError
from browservm.vmm.placement import (
    NoCgroup,
    OwnCgroup,
    ResourceLimits,
    SystemdScope,
    cgroup2_mount,
    choose_placement,
    scope_unit,
    systemd_is_init,
    systemd_run_argv,
)

# /proc/self/mountinfo of a hybrid host (v1 controllers, v2 at /sys/fs/cgroup/unified), abridged.
HYBRID = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A pure v2 host (Debian 12 and later), with optional fields before the separator.
PURE = """\
25 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw,errors=remount-ro
26 25 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
29 26 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""


def test_the_systemd_run_command_is_a_transient_scope_named_after_the_vm_that_execs_the_vmm() -> None:
    argv = systemd_run_argv(["/usr/bin/qemu-system-x86_64", "-name", "browservm-vm-1"], "vm-1")
    assert argv == [
        "systemd-run", "--scope", "--quiet", "--collect", "--unit=browservm-vm-1.scope",
        "--slice=browservm.slice", "--description=browservm VM vm-1", "--",
        "/usr/bin/qemu-system-x86_64", "-name", "browservm-vm-1",
    ]
    assert scope_unit("vm-1") == "browservm-vm-1.scope"


def test_the_systemd_run_command_takes_only_well_formed_vm_ids() -> None:
    with pytest.raises(InvalidVmId):
        systemd_run_argv(["qemu-system-x86_64"], "../../etc")


def test_a_vmm_missing_from_path_is_named_before_systemd_makes_a_scope_for_it() -> None:
    with pytest.raises(VmmError) as excinfo:
        SystemdScope().wrap(["qemu-system-does-not-exist"], "vm-1")
    assert excinfo.value.reason == "cannot run qemu-system-does-not-exist: No such file or directory"


@pytest.mark.parametrize(("text", "mount"), [
    (HYBRID, Path("/sys/fs/cgroup/unified")),
    (PURE, Path("/sys/fs/cgroup")),
    ("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", None),
    ("", None),
])
def test_the_cgroup2_mount_is_found_in_mountinfo(text: str, mount: Path | None) -> None:
    assert cgroup2_mount(text) == mount


def test_a_mount_of_the_whole_hierarchy_wins_over_a_bind_mount_of_a_subtree_and_escapes_are_read() -> None:
    text = ("50 22 0:38 /machine.slice /srv/cg rw - cgroup2 cgroup2 rw\n"
            "51 22 0:38 / /run/my\\040cgroups rw - cgroup2 cgroup2 rw\n")
    assert cgroup2_mount(text) == Path("/run/my cgroups")
    assert cgroup2_mount(text.splitlines()[0]) == Path("/srv/cg")


def test_systemd_counts_as_init_only_with_its_runtime_directory_and_pid_1_named_systemd(tmp_path: Path) -> None:
    runtime, comm = tmp_path / "run-systemd-system", tmp_path / "comm"
    comm.write_text("systemd\n")
    assert not systemd_is_init(runtime, comm)
    runtime.mkdir()
    assert systemd_is_init(runtime, comm)
    comm.write_text("tini\n")  # a container that kept /run/systemd from its image
    assert not systemd_is_init(runtime, comm)


def test_without_a_cgroup2_hierarchy_there_is_no_cgroup_and_the_reason_says_so(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs"))
    chosen = choose_placement(mountinfo, tmp_path / "absent", tmp_path / "absent-comm")
    assert isinstance(chosen, NoCgroup)
    assert "no cgroup v2 hierarchy is mounted" in chosen.reason
    assert "stop when a service manager stops it" in chosen.reason
    # Nothing to make, nothing to release, however often.
    assert chosen.wrap(["qemu-system-x86_64"], "vm-1") == ["qemu-system-x86_64"]
    assert chosen.prepare("vm-1") is None
    chosen.release("vm-1")
    chosen.release("vm-1")


def test_an_unwritable_cgroup2_hierarchy_means_no_cgroup(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {tmp_path / 'not-there'} ro - cgroup2 cgroup2 ro\n")
    chosen = choose_placement(mountinfo, tmp_path / "absent", tmp_path / "absent-comm")
    assert isinstance(chosen, NoCgroup) and "is not writable" in chosen.reason


def test_a_writable_cgroup2_hierarchy_gives_each_vm_a_cgroup_under_browservm_vms(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"41 31 0:38 / {tmp_path} rw - cgroup2 cgroup2 rw\n")
    chosen = choose_placement(mountinfo, tmp_path / "absent", tmp_path / "absent-comm")
    assert isinstance(chosen, OwnCgroup)
    assert chosen.cgroup("vm-1") == tmp_path / "browservm-vms" / "vm-1"
    assert chosen.wrap(["qemu-system-x86_64", "-name", "x"], "vm-1") == ["qemu-system-x86_64", "-name", "x"]
    with pytest.raises(InvalidVmId):
        chosen.cgroup("../escape")


@pytest.mark.skipif(shutil.which("systemd-run") is None, reason="systemd-run is not installed")
def test_where_systemd_is_init_vmms_get_scopes(tmp_path: Path) -> None:
    runtime, comm = tmp_path / "system", tmp_path / "comm"
    runtime.mkdir()
    comm.write_text("systemd\n")
    assert isinstance(choose_placement(tmp_path / "no-mountinfo", runtime, comm), SystemdScope)


def test_the_service_unit_runs_serve_restarts_on_failure_and_reads_its_settings_file() -> None:
    unit_file = Path(browservm.__file__).parent / "files" / "browservm.service"
    text = unit_file.read_text()
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(text)
    service = unit["Service"]
    assert service["ExecStart"] == "/usr/local/bin/browservm serve"
    assert service["Restart"] == "on-failure"
    assert service["EnvironmentFile"] == "-/etc/default/browservm"
    assert "KillMode" not in service  # the default (control-group) is safe: VMs are not in it
    assert "scope of its own" in text and "KillMode" in text  # and the file says why
    assert unit["Install"]["WantedBy"] == "multi-user.target"


LIMITS = ResourceLimits(cpus=2, memory_mib=2048, tasks=258)


def test_a_scope_carries_the_vms_cpu_memory_and_task_limits() -> None:
    argv = systemd_run_argv(["qemu-system-x86_64"], "vm-1", limits=LIMITS)
    assert argv[argv.index("--") - 3:argv.index("--")] == [
        "--property=CPUQuota=200%", "--property=MemoryMax=2048M", "--property=TasksMax=258"]


def cgroup_tree(tmp_path: Path, delegated: str) -> OwnCgroup:
    """A directory laid out as a cgroup v2 root whose subtree_control delegates `delegated`."""
    (tmp_path / "cgroup.subtree_control").write_text(delegated + "\n")
    placement = OwnCgroup(tmp_path)
    (tmp_path / "browservm-vms" / "vm-1").mkdir(parents=True)
    (tmp_path / "browservm-vms" / "vm-1" / "cgroup.procs").write_text("")
    return placement


def test_own_cgroup_writes_every_limit_the_hierarchy_delegates(tmp_path: Path) -> None:
    placement = cgroup_tree(tmp_path, "cpuset cpu io memory pids")
    assert placement.enforced == ("cpu", "memory", "pids") and "not enforced" not in placement.reason
    placement.prepare("vm-1", LIMITS)
    cgroup = tmp_path / "browservm-vms" / "vm-1"
    assert (tmp_path / "browservm-vms" / "cgroup.subtree_control").read_text() == "+cpu +memory +pids"
    assert (cgroup / "cpu.max").read_text() == "200000 100000"
    assert (cgroup / "memory.max").read_text() == str(2048 * 2**20)
    assert (cgroup / "pids.max").read_text() == "258"


def test_own_cgroup_says_which_limits_it_cannot_enforce_and_writes_none_of_them(tmp_path: Path) -> None:
    placement = cgroup_tree(tmp_path, "pids")
    assert placement.enforced == ("pids",)
    assert "its cpu, memory limits are not enforced" in placement.reason
    placement.prepare("vm-1", LIMITS)
    assert sorted(p.name for p in (tmp_path / "browservm-vms" / "vm-1").iterdir()) == ["cgroup.procs", "pids.max"]
    assert "no CPU, memory or task limits" in NoCgroup("no cgroup v2 hierarchy").reason
