"""The one small interface every VMM driver offers, and the choice between them."""

from __future__ import annotations

import json
import shutil
import signal
import socket
from pathlib import Path
from typing import Protocol

from browservm.errors import InvalidInput, VmmError
from browservm.hostnet.netns import NetworkNamespace
from browservm.vmm import firecracker, process
from browservm.vmm.process import VmmProcess
from browservm.vmm.qemu import QEMU, AccelProbe, qemu_argv
from browservm.vmm.spec import VmSpec


class VmmDriver(Protocol):
    name: str

    def accel(self, kernel: Path) -> str: ...

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess: ...

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None: ...


def _kill(spec: VmSpec, vmm: VmmProcess, graceful_exit: bool, timeout: float) -> None:
    """After a graceful request: wait for the exit, then SIGKILL, then make sure it is gone."""
    if graceful_exit and process.wait_exit(vmm, timeout):
        return
    process.signal_process(vmm, signal.SIGKILL)
    if not process.wait_exit(vmm, 10):
        raise VmmError(spec.vm_id, "stop", f"PID {vmm.pid} survived SIGKILL")


class QemuDriver:
    name = "qemu"

    def __init__(self, probe: AccelProbe | None = None, qemu: str = QEMU) -> None:
        self._probe = probe or AccelProbe(qemu)
        self._qemu = qemu
        self._accel: dict[Path, str] = {}

    def accel(self, kernel: Path) -> str:
        if kernel not in self._accel:
            self._accel[kernel] = self._probe.choose(kernel).name
        return self._accel[kernel]

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        argv = qemu_argv(spec, self.accel(spec.kernel), self._qemu)
        return process.spawn(argv, spec.vmm_log, netns, spec.vm_id)

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        _kill(spec, vmm, self._quit(spec), timeout)

    def _quit(self, spec: VmSpec) -> bool:
        """Ask QEMU to quit through QMP (it flushes and closes its disks); False if it cannot be asked."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qmp:
                qmp.settimeout(5)
                qmp.connect(str(spec.control_socket))
                stream = qmp.makefile("rwb")
                stream.readline()  # the greeting
                for command in ("qmp_capabilities", "quit"):
                    stream.write(json.dumps({"execute": command}).encode() + b"\n")
                    stream.flush()
                    stream.readline()
        except OSError:
            return False
        return True


class FirecrackerDriver:
    name = "firecracker"

    def __init__(self, binary: str = firecracker.FIRECRACKER, jailer: firecracker.JailerOptions | None = None,
                 jailer_binary: str = firecracker.JAILER) -> None:
        self._binary = shutil.which(binary) or binary
        self._jailer = jailer
        self._jailer_binary = jailer_binary

    def accel(self, kernel: Path) -> str:
        return "kvm"

    def start(self, spec: VmSpec, netns: NetworkNamespace) -> VmmProcess:
        if self._jailer is not None:
            firecracker.prepare_jail(spec, self._jailer, self._binary)
            argv = firecracker.jailer_argv(spec, self._jailer, self._jailer_binary, self._binary)
        else:
            config = spec.directory / "vm-config.json"
            config.write_text(json.dumps(firecracker.firecracker_config(spec), indent=2))
            spec.vmm_log.touch()  # Firecracker's logger wants an existing file
            argv = firecracker.firecracker_argv(spec, config, self._binary)
        # Firecracker's stdout is the guest's serial console.
        return process.spawn(argv, spec.console_log, netns, spec.vm_id)

    def stop(self, spec: VmSpec, vmm: VmmProcess, timeout: float) -> None:
        try:
            firecracker.FirecrackerApi(spec.vm_id, spec.control_socket).send_ctrl_alt_del()
            asked = True
        except VmmError:
            asked = False
        _kill(spec, vmm, asked, timeout)
        if self._jailer is not None:
            shutil.rmtree(firecracker.jail_root(spec, self._jailer, self._binary).parent, ignore_errors=True)


def choose_driver(name: str, probe: AccelProbe | None = None,
                  jailer: firecracker.JailerOptions | None = None) -> VmmDriver:
    """`firecracker`, `qemu`, or `auto`: Firecracker when it can run here, else QEMU."""
    if name == "qemu":
        return QemuDriver(probe)
    if name == "firecracker":
        usable, reason = firecracker.available()
        if not usable:
            raise VmmError("-", "choose driver", f"firecracker cannot run here: {reason}")
        return FirecrackerDriver(jailer=jailer)
    if name == "auto":
        usable, _ = firecracker.available()
        return FirecrackerDriver(jailer=jailer) if usable else QemuDriver(probe)
    raise InvalidInput("vmm", name, "must be auto, firecracker or qemu")
