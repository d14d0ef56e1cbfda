"""What a running VMM actually uses for a VM, read from the VMM itself, to compare with the record.

QEMU: its command line (/proc/PID/cmdline): `-netdev tap,...,ifname=TAP`, `-device
virtio-net-device,...,mac=MAC`, `-append BOOT_ARGS`, `-kernel`, the root drive's `file=`.
Firecracker: the `vm-config.json` it was started with (in the VM's directory, or in its jail):
`host_dev_name`, `iface_id`, `guest_mac`, `boot_args`, the kernel and the root drive.
The incident began with a hard-coded `iface_id`: the record said one TAP, the VMM used another.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path

from browservm.vmdir import VmDirectory
from browservm.vmm.process import VmmProcess

_VALUE_OPTIONS = {"-netdev", "-device", "-append", "-kernel", "-drive"}


@dataclass(frozen=True)
class VmmView:
    source: str  # where it was read: "/proc/PID/cmdline" or a config file
    tap: str | None
    iface_id: str | None
    mac: str | None
    boot_args: str | None
    kernel: str | None
    rootfs: str | None


def _options(value: str) -> dict[str, str]:
    """QEMU's `kind,key=value,...` option string as a dict (the bare first word under "")."""
    found: dict[str, str] = {}
    for index, part in enumerate(value.split(",")):
        key, sep, rest = part.partition("=")
        if sep:
            found[key] = rest
        elif index == 0:
            found[""] = part
    return found


def qemu_view(argv: list[str], source: str) -> VmmView:
    tap = mac = boot_args = kernel = rootfs = None
    for option, value in itertools.pairwise(argv):
        if option not in _VALUE_OPTIONS:
            continue
        fields = _options(value)
        if option == "-netdev" and fields.get("") == "tap":
            tap = fields.get("ifname")
        elif option == "-device" and fields.get("", "").startswith("virtio-net"):
            mac = fields.get("mac")
        elif option == "-append":
            boot_args = value
        elif option == "-kernel":
            kernel = value
        elif option == "-drive" and fields.get("id") == "root":
            rootfs = fields.get("file")
    return VmmView(source, tap, tap, mac, boot_args, kernel, rootfs)


def firecracker_view(config: dict[str, object], source: str) -> VmmView:
    interfaces = config.get("network-interfaces")
    first = interfaces[0] if isinstance(interfaces, list) and interfaces and isinstance(interfaces[0], dict) else {}
    boot = config.get("boot-source") if isinstance(config.get("boot-source"), dict) else {}
    assert isinstance(boot, dict)
    drives = config.get("drives") if isinstance(config.get("drives"), list) else []
    assert isinstance(drives, list)
    root = next((d for d in drives if isinstance(d, dict) and d.get("is_root_device")), {})
    return VmmView(source, first.get("host_dev_name"), first.get("iface_id"), first.get("guest_mac"),
                   boot.get("boot_args"), boot.get("kernel_image_path"), root.get("path_on_host"))


def read_vmm_view(vmm: VmmProcess, directory: Path, jail_root: Path | None = None) -> VmmView:
    """Blocking. Raises OSError (or ValueError for an unreadable config) when it cannot be read."""
    exe = os.path.basename(os.readlink(f"/proc/{vmm.pid}/exe").removesuffix(" (deleted)"))
    if exe.startswith("qemu-system-"):
        raw = Path(f"/proc/{vmm.pid}/cmdline").read_bytes()
        return qemu_view([word.decode(errors="replace") for word in raw.split(b"\0")], f"/proc/{vmm.pid}/cmdline")
    config = VmDirectory(directory).vm_config
    if jail_root is not None and not config.exists():
        config = VmDirectory(jail_root).vm_config
    document = json.loads(config.read_text())
    if not isinstance(document, dict):
        raise ValueError(f"{config} is not a JSON object")
    return firecracker_view(document, str(config))
