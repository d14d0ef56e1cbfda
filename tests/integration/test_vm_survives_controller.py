"""A VM outlives its controller however the controller stops, even all at once with its control group.

A service manager stops a service by killing every process in the service's control group
(systemd's default KillMode=control-group). Here the "service" is a cgroup the test makes:
`vm create` and `serve` run in it, then the whole cgroup is killed the way systemd would.
The VM must keep running and answering, and the next controller must find it.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from browservm.hostnet.netns import NetworkNamespace
from browservm.vm.readiness import desktop_banner
from browservm.vmm import process
from browservm.vmm.placement import cgroup2_root, choose_placement, remove_cgroup
from browservm.vmm.process import VmmProcess

from .conftest import Controllers

pytestmark = [pytest.mark.host, pytest.mark.vm]

# Joins the cgroup named by argv[1] before it becomes the command in argv[2:]: nothing the
# command starts can escape the cgroup by starting before the move.
_IN_CGROUP = "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid())); os.execv(sys.argv[2], sys.argv[2:])"


def browservm_argv(controllers: Controllers, *args: str) -> list[str]:
    return [sys.executable, "-m", "browservm", *args, "--netns", controllers.netns,
            "--state-dir", str(controllers.state_dir), "--kernel", str(controllers.kernel),
            "--rootfs", str(controllers.rootfs), "--vmm", "qemu"]


def in_cgroup(cgroup: Path, argv: list[str]) -> list[str]:
    return [sys.executable, "-c", _IN_CGROUP, str(cgroup / "cgroup.procs"), *argv]


class Lines:
    """A process's output, line by line, each wait with a deadline."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        assert child.stdout is not None
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        stdout = child.stdout

        def read() -> None:
            for line in stdout:
                self._lines.put(line.rstrip("\n"))
            self._lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def until(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"exited before printing {prefix!r}; it printed {self.seen}"
            self.seen.append(line)
            if line.startswith(prefix):
                return line


@pytest.fixture
def service_cgroup() -> Iterator[Path]:
    """A cgroup standing in for a service's: `browservm-test-<pid>/service` under the cgroup2 root."""
    root = cgroup2_root()
    if root is None or not os.access(root, os.W_OK):
        pytest.skip(f"needs a writable cgroup v2 hierarchy: {choose_placement().reason}")
    top = root / f"browservm-test-{os.getpid()}"
    service = top / "service"
    service.mkdir(parents=True)
    try:
        yield service
    finally:
        remove_cgroup(top, "-")  # kills what the test left in it, then removes both levels


def cgroup_empty(cgroup: Path, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while "populated 0" not in (cgroup / "cgroup.events").read_text():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_vm_outlives_its_controllers_killed_with_their_cgroup_and_the_next_controller_finds_it(
        controllers: Controllers, service_cgroup: Path) -> None:
    created: dict[str, Any] | None = None
    started: list[subprocess.Popen[str]] = []
    try:
        create = subprocess.Popen(in_cgroup(service_cgroup, browservm_argv(controllers, "vm", "create", "--json")),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        started.append(create)
        out, err = create.communicate(timeout=900)
        assert create.returncode == 0, err[-3000:]
        created = json.loads(out)
        assert created is not None and created["state"] == "ready"
        vmm = VmmProcess(created["pid"], created["pid_start_time"])
        vm_directory = Path(created["directory"])

        serve_argv = browservm_argv(controllers, "serve", "--listen", "127.0.0.1:0")
        serve = subprocess.Popen(in_cgroup(service_cgroup, serve_argv), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        started.append(serve)
        assert "watching 1 VM(s)" in Lines(serve).until("serve:")
        in_service = (service_cgroup / "cgroup.procs").read_text().split()
        assert str(serve.pid) in in_service

        # What systemd does to a service's control group on `systemctl stop`.
        (service_cgroup / "cgroup.kill").write_text("1")
        assert cgroup_empty(service_cgroup)
        assert serve.wait(timeout=30) == -9

        assert process.alive(vmm), (f"the VMM died with the controller's cgroup; it was "
                                    f"{'in' if str(vmm.pid) in in_service else 'outside'} it")
        assert str(vmm.pid) not in in_service
        assert process.is_vmm_of(vmm, vm_directory)
        address = IPv4Address(created["address"].split("/")[0])
        banner = asyncio.run(desktop_banner(NetworkNamespace(controllers.netns), address, 6080, 30,
                                            websocket=True))
        assert banner == "RFB 003.008"

        # The next controller, outside that cgroup, re-finds the VM and watches it.
        restarted = subprocess.Popen(serve_argv, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        started.append(restarted)
        lines = Lines(restarted)
        lines.until("serve:")
        assert f"reconcile: {created['vm_id']}: VMM {vmm.pid} alive, watching" in lines.seen, lines.seen
        restarted.terminate()
        assert restarted.wait(timeout=30) == 0
    finally:
        for child in started:
            if child.poll() is None:
                child.kill()
                child.wait(timeout=30)
        if created is not None:
            # Stopped the graceful way first; the controllers fixture checks nothing is left.
            subprocess.run(browservm_argv(controllers, "vm", "rm", created["vm_id"]), capture_output=True,
                           timeout=120, check=False)
            # The VM's own cgroup, made by spawn: the manager's release removes it once it calls
            # driver.release; until then, here (idempotent either way).
            choose_placement().release(created["vm_id"])
