"""What a person at the command line sees when things go wrong: one controller per state directory,
an OS error as a failure with its stage and reason (never a traceback), and Ctrl-C during a
create that leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from browservm.controller import ServeLock
from browservm.errors import AlreadyServed

from .conftest import Controllers, run, vmm_pids_under

pytestmark = pytest.mark.host


def argv(controllers: Controllers, *args: str) -> list[str]:
    return [sys.executable, "-m", "browservm", *args, "--netns", controllers.netns,
            "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
            "--rootfs", str(controllers.rootfs), "--vmm", "qemu"]


def test_a_second_serve_on_one_state_directory_is_refused_naming_the_first(tmp_path: Path) -> None:
    with ServeLock(tmp_path):
        other = subprocess.run([sys.executable, "-c", "import sys, pathlib\nfrom browservm.controller import "
                                "ServeLock\nwith ServeLock(pathlib.Path(sys.argv[1])): pass", str(tmp_path)],
                               capture_output=True, text=True, timeout=60, check=False)
        assert other.returncode == 1 and f"already served by process {os.getpid()}" in other.stderr
        with pytest.raises(AlreadyServed) as excinfo:
            ServeLock(tmp_path).__enter__()
        assert excinfo.value.pid == os.getpid()
    with ServeLock(tmp_path):  # free again once the first is gone
        pass


@pytest.mark.vm
def test_serve_refuses_a_state_directory_another_serve_holds(controllers: Controllers) -> None:
    controllers.open()
    with ServeLock(controllers.state_dir):
        refused = subprocess.run(argv(controllers, "serve"), capture_output=True, text=True, timeout=120, check=False)
    assert refused.returncode == 1, refused.stderr
    assert f"already served by process {os.getpid()}; stop it first or use another --state-dir" in refused.stderr
    assert "Traceback" not in refused.stderr


# Mounts a 1 MiB tmpfs on the VM directories in a mount namespace of its own, then becomes the CLI:
# the disk of a VM then really runs out of space, and nothing is left mounted on the host.
_FULL_DISK = ("import os, subprocess, sys\n"
              "subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=1m', 'tmpfs', sys.argv[1]], check=True)\n"
              "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


@pytest.mark.vm
def test_a_full_disk_is_a_failure_of_disk_clone_with_its_reason_not_a_traceback(controllers: Controllers) -> None:
    controllers.open()
    vms = controllers.state_dir / "vms"
    vms.mkdir(parents=True, exist_ok=True)
    command = argv(controllers, "vm", "create", "--json")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", sys.executable, "-c", _FULL_DISK,
                           str(vms), *command[1:]], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    record = json.loads(done.stdout)
    assert record["state"] == "failed" and record["failure"]["hop"] == "disk.clone"
    assert "No space left on device" in record["failure"]["reason"]
    assert list(vms.iterdir()) == []  # its directory went with it, on the host's view too
    assert run("ip", "-o", "link", "show", "type", "tun", netns=controllers.netns).stdout == ""


@pytest.mark.vm
def test_ctrl_c_during_a_create_leaves_nothing_running(controllers: Controllers) -> None:
    controllers.open()
    creating = subprocess.Popen(argv(controllers, "vm", "create"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    assert creating.stdout is not None
    seen = []
    for line in creating.stdout:  # interrupt while the guest boots: the VMM runs, readiness is pending
        seen.append(line)
        if "vmm.spawn" in line:
            break
    creating.send_signal(signal.SIGINT)
    rest, _ = creating.communicate(timeout=120)
    assert creating.returncode == 130, "".join(seen) + rest
    assert "Traceback" not in rest
    assert vmm_pids_under(controllers.state_dir) == []
    assert run("ip", "-o", "link", "show", "type", "tun", netns=controllers.netns).stdout == ""
    assert list((controllers.state_dir / "vms").iterdir()) == []
    shown = json.loads(subprocess.run(argv(controllers, "vm", "ls", "--json"), capture_output=True, text=True,
                                      timeout=60, check=True).stdout)
    assert [(vm["state"], vm["failure"]["hop"], vm["holds_resources"]) for vm in shown] == [
        ("failed", "controller", False)]
