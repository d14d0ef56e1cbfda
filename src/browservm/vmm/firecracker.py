"""The Firecracker driver: a per-VM `vm-config.json`, the API socket, optional jailer.

The network interface's `iface_id` and `host_dev_name` are both the VM's TAP
name from ids.py: a hard-coded `iface_id` was half of the incident this
product exists to end. Firecracker replaces its default kernel command line
once `boot_args` is set, so the generated line is the whole line.

An unjailed Firecracker runs in its VM's directory (process.spawn puts it there) and is given
the VM's own disks by paths relative to it (`in_vm_directory`), as a jailed one is given fixed
names in its chroot: a snapshot records drive paths as given, and a clone started in its own
directory then opens its own disks (firecracker_snapshot.py).

Generated configs and API request bodies are checked in the tests against
Firecracker's own API specification. Firecracker needs a KVM host; where it
cannot run, `available()` says why.
"""

from __future__ import annotations

import dataclasses
import errno
import http.client
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from browservm.errors import VmmError
from browservm.vmdir import VM_CONFIG, VmDirectory
from browservm.vmm.spec import VmSpec

FIRECRACKER = "firecracker"
JAILER = "jailer"


def in_vm_directory(spec: VmSpec) -> VmSpec:
    """The spec as an unjailed Firecracker sees it from its working directory, the VM's directory:
    the VM's own disks by paths relative to it; the shared images stay where they are.

    A snapshot's state records each drive's path as Firecracker was given it, and /snapshot/load
    opens exactly that path (PATCH /drives exists only after the load, and by then the VM the
    snapshot was taken of, with its directory, is gone). Relative names are the same for every
    VM, so a VM restored in its own directory opens its own overlay and config disk.
    """
    def own(path: Path | None) -> Path | None:
        if path is None or not path.is_relative_to(spec.directory):
            return path
        return path.relative_to(spec.directory)

    return dataclasses.replace(spec, overlay=own(spec.overlay), config_disk=own(spec.config_disk))


def logger_config(spec: VmSpec) -> dict[str, Any]:
    """Firecracker's own log, to vmm.log (the file must exist: Firecracker does not create it)."""
    return {"log_path": str(spec.vmm_log), "level": "Info", "show_level": True}


def firecracker_config(spec: VmSpec) -> dict[str, Any]:
    """The `--config-file` document for `spec` (a value: tested without running anything)."""
    drives: list[dict[str, Any]] = [
        {"drive_id": "rootfs", "path_on_host": str(spec.rootfs), "is_root_device": True, "is_read_only": True},
    ]
    if spec.overlay is not None:
        drives.append({"drive_id": "overlay", "path_on_host": str(spec.overlay), "is_root_device": False,
                       "is_read_only": False})
        if spec.config_disk is not None:  # /dev/vdc: secrets travel here, never on the kernel command line
            drives.append({"drive_id": "config", "path_on_host": str(spec.config_disk), "is_root_device": False,
                           "is_read_only": True})
    return {
        "boot-source": {"kernel_image_path": str(spec.kernel), "boot_args": spec.boot_args},
        "drives": drives,
        "network-interfaces": [{"iface_id": spec.tap, "host_dev_name": spec.tap, "guest_mac": spec.mac}],
        "machine-config": {"vcpu_count": spec.vcpus, "mem_size_mib": spec.mem_mib, "smt": False},
        "logger": logger_config(spec),
    }


def write_vm_config(spec: VmSpec) -> Path:
    """Write the `--config-file` of an unjailed Firecracker (disks relative to the VM's directory)."""
    config = spec.files.vm_config
    try:
        config.write_text(json.dumps(firecracker_config(in_vm_directory(spec)), indent=2))
    except OSError as exc:
        raise VmmError(spec.vm_id, "write vm-config.json", f"cannot write {config}: {exc.strerror}") from exc
    return config


def firecracker_argv(spec: VmSpec, config_path: Path, firecracker: str = FIRECRACKER) -> list[str]:
    # The guest's serial console is Firecracker's stdout, which the driver sends to console.log.
    return [firecracker, "--id", spec.vm_id, "--api-sock", str(spec.control_socket),
            "--config-file", str(config_path)]


def firecracker_restore_argv(spec: VmSpec, firecracker: str = FIRECRACKER) -> list[str]:
    """A Firecracker waiting for /snapshot/load: no config file (a restored VM's devices, memory and
    vCPUs come from the snapshot; only the logger may be set before the load)."""
    return [firecracker, "--id", spec.vm_id, "--api-sock", str(spec.control_socket)]


@dataclass(frozen=True)
class JailerOptions:
    """Run Firecracker through the jailer: its own chroot, an unprivileged uid/gid, cgroup limits
    (all of the VM's vCPUs, and its memory plus `memory_overhead_mib` for Firecracker itself)."""

    uid: int
    gid: int
    chroot_base: Path
    limit_cpu: bool = True
    memory_overhead_mib: int | None = 128


# Inside the chroot every file sits at the root under a fixed name.
_JAILED_API_SOCKET = "/run/firecracker.sock"


def jail_root(vm_id: str, options: JailerOptions, firecracker: str = FIRECRACKER) -> Path:
    """Where the jailer chroots this VM's Firecracker: <base>/<exec file name>/<vm id>/root.

    Also the jailed VMM's identity: its /proc/PID/root (process.is_vmm_of, process.owned_vmms).
    """
    return options.chroot_base / Path(firecracker).name / vm_id / "root"


def jail_cgroup(cgroup2_root: Path, vm_id: str, firecracker: str = FIRECRACKER) -> Path:
    """The cgroup the jailer moves Firecracker into when given --cgroup limits: its default parent
    cgroup is the exec file's name, under the root of the v2 hierarchy."""
    return cgroup2_root / Path(firecracker).name / vm_id


def jailed_spec(spec: VmSpec) -> VmSpec:
    """The spec as Firecracker sees it from inside its chroot."""
    inside = VmDirectory(Path("/"))
    return dataclasses.replace(spec, kernel=Path("/vmlinux"), rootfs=Path("/rootfs.ext4"),
                               overlay=None if spec.overlay is None else inside.overlay, directory=inside.path,
                               config_disk=None if spec.config_disk is None else inside.config_disk)


def jail_ids(spec: VmSpec, options: JailerOptions) -> tuple[int, int]:
    """The uid and gid the jailed Firecracker runs as: the VM's own when it has one."""
    return (spec.run_as, spec.run_as) if spec.run_as is not None else (options.uid, options.gid)


def prepare_jail(spec: VmSpec, options: JailerOptions, firecracker: str = FIRECRACKER) -> Path:
    """Put what Firecracker needs into its chroot (hard links: no copy of the golden image)."""
    root = jail_root(spec.vm_id, options, firecracker)
    jail = VmDirectory(root)  # the same names as a VM's directory
    uid, gid = jail_ids(spec, options)
    inside = jailed_spec(spec)
    try:
        (root / "run").mkdir(parents=True)
        for source, target in ((spec.kernel, inside.kernel), (spec.rootfs, inside.rootfs),
                               (spec.overlay, inside.overlay), (spec.config_disk, inside.config_disk)):
            if source is not None and target is not None:
                os.link(source, root / target.name)
        if spec.overlay is not None:
            os.chown(jail.overlay, uid, gid)  # the VM's own disk: writable by it
        if spec.config_disk is not None:
            os.chown(jail.config_disk, uid, gid)  # 0600: for this VM's Firecracker alone
        jail.vm_config.write_text(json.dumps(firecracker_config(inside), indent=2))
        jail.vmm_log.touch()
        for owned in (root / "run", jail.vmm_log):
            os.chown(owned, uid, gid)
        # Firecracker makes its API socket inside the chroot; the controller reaches it through this link.
        spec.control_socket.symlink_to(root / _JAILED_API_SOCKET.lstrip("/"))
    except OSError as exc:
        hint = (" (the jail's base directory must be on the same file system as the images)"
                if exc.errno == errno.EXDEV else "")
        raise VmmError(spec.vm_id, "prepare jail", f"{exc.filename}: {exc.strerror}{hint}") from exc
    return root


def jailer_argv(spec: VmSpec, options: JailerOptions, jailer: str = JAILER,
                firecracker: str = FIRECRACKER) -> list[str]:
    """The jailer command for a VM whose chroot `prepare_jail` filled."""
    uid, gid = jail_ids(spec, options)
    argv = [jailer, "--id", spec.vm_id, "--exec-file", firecracker, "--uid", str(uid), "--gid", str(gid),
            "--chroot-base-dir", str(options.chroot_base), "--cgroup-version", "2"]
    if options.limit_cpu:
        period = 100_000
        argv += ["--cgroup", f"cpu.max={period * spec.vcpus} {period}"]
    if options.memory_overhead_mib is not None:
        argv += ["--cgroup", f"memory.max={(spec.mem_mib + options.memory_overhead_mib) * 2**20}"]
    return [*argv, "--", "--api-sock", _JAILED_API_SOCKET, "--config-file", f"/{VM_CONFIG}"]


AS_ROOT = ("Firecracker cannot drop root by itself: without its jailer it would run, with the guest it holds, "
           "as root; run it through the jailer (BROWSERVM_JAILER=1, as the VM's own uid) or the controller as "
           "an unprivileged user, or use QEMU")


def root_refusal(jailer: JailerOptions | None, run_as: int | None, euid: int) -> str | None:
    """Why a Firecracker started by a process of `euid` would run as root, or None: it would not.

    Unjailed, it runs as the controller's user; jailed, as the VM's own uid or else the jailer's
    (--vmm-user's) uid, which may be root too.
    """
    if jailer is None:
        return AS_ROOT if euid == 0 else None
    if run_as is None and jailer.uid == 0:
        return ("the jailer would run Firecracker as root: neither a uid of the VM's own (BROWSERVM_VM_UIDS) "
                "nor a --vmm-user other than root is set")
    return None


def available(firecracker: str = FIRECRACKER) -> tuple[bool, str]:
    """Whether Firecracker can run here, and if not, why."""
    if shutil.which(firecracker) is None:
        return False, f"no {firecracker} binary on PATH"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is missing or not accessible: Firecracker needs KVM"
    return True, "firecracker and /dev/kvm are present"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self._path))


class FirecrackerApi:
    """Requests to one Firecracker's API socket."""

    def __init__(self, vm_id: str, socket_path: Path, timeout: float = 5.0) -> None:
        self._vm_id = vm_id
        self._socket = socket_path
        self._timeout = timeout

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        connection = _UnixHTTPConnection(self._socket, self._timeout)
        try:
            payload = None if body is None else json.dumps(body)
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            text = response.read().decode(errors="replace")
        except OSError as exc:
            raise VmmError(self._vm_id, f"API {method} {path}", f"{self._socket}: {exc}") from exc
        finally:
            connection.close()
        if response.status >= 300:
            raise VmmError(self._vm_id, f"API {method} {path}", f"HTTP {response.status}: {_fault(text)}")
        return json.loads(text) if text.strip() else None

    def send_ctrl_alt_del(self) -> None:
        self.request("PUT", "/actions", ctrl_alt_del_request())


def _fault(text: str) -> str:
    """Firecracker's reason for refusing a request: the `fault_message` of its Error body."""
    try:
        body = json.loads(text)
    except ValueError:
        return text.strip() or "no reason given"
    if isinstance(body, dict) and isinstance(body.get("fault_message"), str):
        return str(body["fault_message"])
    return text.strip()


def ctrl_alt_del_request() -> dict[str, str]:
    """The graceful-stop request: the guest sees Ctrl+Alt+Del on its i8042 controller."""
    return {"action_type": "SendCtrlAltDel"}
