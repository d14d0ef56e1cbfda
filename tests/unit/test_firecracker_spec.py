"""Everything browservm sends to Firecracker, validated against Firecracker's own API specification.

The specification (swagger 2.0) lets unknown properties through; here every
object is made strict, so a misspelt key such as "iface-id" fails the test
instead of being silently ignored by Firecracker.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import re
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]

from browservm.guest.bootargs import BootArgs, IpConfig, build_boot_args, ip_config_from_cmdline
from browservm.ids import names_for
from browservm.vmm.firecracker import (
    JailerOptions,
    ctrl_alt_del_request,
    firecracker_argv,
    firecracker_config,
    firecracker_restore_argv,
    in_vm_directory,
    jailer_argv,
    logger_config,
    prepare_jail,
)
from browservm.vmm.firecracker_snapshot import snapshot_create_request, snapshot_load_request, vm_state_request
from browservm.vmm.spec import VmSpec

# Firecracker's specification is reference data kept beside the repository, never copied into it.
SPEC_PATH = Path(os.environ.get("BROWSERVM_FIRECRACKER_SPEC")
                 or Path(__file__).resolve().parents[3] / "shared" / "firecracker" / "firecracker.yaml")
pytestmark = pytest.mark.skipif(not SPEC_PATH.exists(), reason=f"Firecracker's API specification not at {SPEC_PATH}")


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {key: strict(value) for key, value in node.items()}
        if node.get("type") == "object" and "properties" in node:
            node.setdefault("additionalProperties", False)
        return node
    if isinstance(node, list):
        return [strict(item) for item in node]
    return node


@functools.cache
def api_spec() -> dict[str, Any]:
    """Firecracker's specification, every object in it strict."""
    spec: dict[str, Any] = strict(yaml.safe_load(SPEC_PATH.read_text()))
    return spec


@pytest.fixture(scope="module")
def definitions() -> dict[str, Any]:
    definitions: dict[str, Any] = copy.deepcopy(api_spec()["definitions"])
    return definitions


def validate(definitions: dict[str, Any], name: str, document: object) -> None:
    jsonschema.validate(document, {"$ref": f"#/definitions/{name}", "definitions": definitions})


def validate_request(method: str, path: str, body: object) -> None:
    """`body` sent as `method path` is what the specification's operation at that path takes: the
    path and method exist, and the body is valid against that operation's body parameter."""
    def matches(template: str) -> bool:
        parts = re.split(r"(\{[^}]+\})", template)  # /drives/{drive_id}: a parameter is one path segment
        return re.fullmatch("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts), path) is not None

    paths: dict[str, Any] = api_spec()["paths"]
    template = next((t for t in paths if matches(t)), None)
    assert template is not None, f"Firecracker's API has no path {path}"
    operation = paths[template].get(method.lower())
    assert operation is not None, f"Firecracker's API takes no {method} on {template}"
    schemas = [p["schema"] for p in operation.get("parameters", []) if p["in"] == "body"]
    if not schemas:
        assert body is None, f"{method} {template} takes no body"
        return
    jsonschema.validate(body, {**schemas[0], "definitions": api_spec()["definitions"]})


def spec_for(vm_id: str, tmp_path: Path, overlay: bool = True) -> VmSpec:
    names = names_for(vm_id)
    ip = IpConfig.static(IPv4Interface("192.168.100.7/24"), IPv4Address("192.168.100.1"), hostname=vm_id)
    return VmSpec(vm_id=vm_id, vcpus=2, mem_mib=1024, kernel=tmp_path / "vmlinux", rootfs=tmp_path / "rootfs.ext4",
                  overlay=tmp_path / "overlay.ext4" if overlay else None, boot_args=build_boot_args(BootArgs(ip=ip)),
                  tap=names.tap, mac=names.mac, directory=tmp_path,
                  config_disk=tmp_path / "config.img" if overlay else None)


@pytest.mark.parametrize("overlay", [True, False])
def test_the_generated_config_is_valid_firecracker_configuration(
        definitions: dict[str, Any], tmp_path: Path, overlay: bool) -> None:
    validate(definitions, "FullVmConfiguration", firecracker_config(spec_for("vm-abc", tmp_path, overlay)))


def test_the_interface_is_the_vms_own_tap_never_a_fixed_name(tmp_path: Path) -> None:
    spec = spec_for("vm-6d83ddf4-8a5c-4185-b071-4b9c7ca4694b", tmp_path)
    (iface,) = firecracker_config(spec)["network-interfaces"]
    assert iface == {"iface_id": spec.tap, "host_dev_name": spec.tap, "guest_mac": spec.mac}
    assert iface["iface_id"] != "eth0"


def test_the_boot_args_are_the_whole_line_with_the_vms_address(tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    boot = firecracker_config(spec)["boot-source"]
    assert "console=ttyS0" in boot["boot_args"].split() and "reboot=k" in boot["boot_args"].split()
    cfg = ip_config_from_cmdline(boot["boot_args"])
    assert cfg is not None and str(cfg.client) == "192.168.100.7"


def test_the_root_drive_is_shared_read_only_the_overlay_writable_and_the_config_disk_read_only(
        tmp_path: Path) -> None:
    root, overlay, config = firecracker_config(spec_for("vm-abc", tmp_path))["drives"]
    assert root["is_root_device"] and root["is_read_only"]
    assert not overlay["is_root_device"] and not overlay["is_read_only"]
    assert config["drive_id"] == "config" and config["is_read_only"] and not config["is_root_device"]


def test_the_graceful_stop_request_is_a_valid_action(definitions: dict[str, Any]) -> None:
    validate(definitions, "InstanceActionInfo", ctrl_alt_del_request())


def test_a_misspelt_key_would_be_caught(definitions: dict[str, Any], tmp_path: Path) -> None:
    config = firecracker_config(spec_for("vm-abc", tmp_path))
    config["network-interfaces"][0]["iface-id"] = config["network-interfaces"][0].pop("iface_id")
    with pytest.raises(jsonschema.ValidationError):
        validate(definitions, "FullVmConfiguration", config)


def test_argv(tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    argv = firecracker_argv(spec, tmp_path / "vm-config.json", firecracker="/usr/bin/firecracker")
    assert argv == ["/usr/bin/firecracker", "--id", "vm-abc", "--api-sock", str(spec.control_socket),
                    "--config-file", str(tmp_path / "vm-config.json")]


def test_the_jail_holds_links_to_the_images_and_a_valid_config_with_chroot_paths(
        definitions: dict[str, Any], tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    for path in (spec.kernel, spec.rootfs, spec.overlay, spec.config_disk):
        assert path is not None
        path.write_bytes(b"x")
    options = JailerOptions(uid=os.getuid(), gid=os.getgid(), chroot_base=tmp_path / "jail")
    root = prepare_jail(spec, options, firecracker="/usr/bin/firecracker")

    assert root == tmp_path / "jail" / "firecracker" / "vm-abc" / "root"
    assert (root / "rootfs.ext4").stat().st_ino == spec.rootfs.stat().st_ino  # a link, not a copy
    config = json.loads((root / "vm-config.json").read_text())
    validate(definitions, "FullVmConfiguration", config)
    assert config["boot-source"]["kernel_image_path"] == "/vmlinux"
    assert [d["path_on_host"] for d in config["drives"]] == ["/rootfs.ext4", "/overlay.ext4", "/config.img"]
    assert config["network-interfaces"][0]["host_dev_name"] == spec.tap
    assert spec.control_socket.readlink() == root / "run" / "firecracker.sock"

    argv = jailer_argv(spec, options, jailer="/usr/bin/jailer", firecracker="/usr/bin/firecracker")
    assert argv[:5] == ["/usr/bin/jailer", "--id", "vm-abc", "--exec-file", "/usr/bin/firecracker"]
    assert argv[argv.index("--uid") + 1] == str(os.getuid())
    assert argv[argv.index("--chroot-base-dir") + 1] == str(tmp_path / "jail")
    assert "cpu.max=200000 100000" in argv  # both vCPUs
    assert f"memory.max={(1024 + 128) * 2**20}" in argv
    assert argv[argv.index("--") + 1:] == ["--api-sock", "/run/firecracker.sock", "--config-file", "/vm-config.json"]


def test_a_vm_with_a_uid_of_its_own_runs_jailed_as_it_and_owns_its_disks(tmp_path: Path) -> None:
    spec = dataclasses.replace(spec_for("vm-abc", tmp_path), run_as=0x70000007)
    for path in (spec.kernel, spec.rootfs, spec.overlay, spec.config_disk):
        assert path is not None
        path.write_bytes(b"x")
    options = JailerOptions(uid=os.getuid(), gid=os.getgid(), chroot_base=tmp_path / "jail")
    root = prepare_jail(spec, options, firecracker="/usr/bin/firecracker")
    argv = jailer_argv(spec, options, jailer="/usr/bin/jailer", firecracker="/usr/bin/firecracker")
    assert (argv[argv.index("--uid") + 1], argv[argv.index("--gid") + 1]) == (str(0x70000007), str(0x70000007))
    assert {(root / name).stat().st_uid for name in ("overlay.ext4", "config.img", "run", "vmm.log")} == {0x70000007}
    assert (root / "rootfs.ext4").stat().st_uid != 0x70000007  # the shared image stays the host's


def test_an_unjailed_firecracker_gets_the_vms_own_disks_relative_to_its_directory(
        definitions: dict[str, Any], tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    config = firecracker_config(in_vm_directory(spec))
    validate(definitions, "FullVmConfiguration", config)
    # The snapshot records these; a clone run in its own directory opens its own disks by them.
    assert [d["path_on_host"] for d in config["drives"]] == [str(spec.rootfs), "overlay.ext4", "config.img"]
    other = firecracker_config(in_vm_directory(spec_for("vm-def", tmp_path / "elsewhere")))
    assert [d["path_on_host"] for d in other["drives"][1:]] == ["overlay.ext4", "config.img"]


def test_a_restoring_firecracker_has_its_api_socket_and_no_config(tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    assert firecracker_restore_argv(spec, "/usr/bin/firecracker") == [
        "/usr/bin/firecracker", "--id", "vm-abc", "--api-sock", str(spec.control_socket)]


def test_the_snapshot_requests_are_valid_firecracker_requests(tmp_path: Path) -> None:
    spec = spec_for("vm-abc", tmp_path)
    state, memory = tmp_path / "state", tmp_path / "state.mem"
    validate_request("PATCH", "/vm", vm_state_request("Paused"))
    validate_request("PATCH", "/vm", vm_state_request("Resumed"))
    validate_request("PUT", "/snapshot/create", snapshot_create_request(state, memory))
    validate_request("PUT", "/logger", logger_config(spec))
    load = snapshot_load_request(state, memory, {"fc-snapshotvm": spec.tap})
    validate_request("PUT", "/snapshot/load", load)
    assert load["mem_backend"] == {"backend_type": "File", "backend_path": str(memory)}
    assert load["network_overrides"] == [{"iface_id": "fc-snapshotvm", "host_dev_name": spec.tap}]
    assert load["resume_vm"] is False  # resumed only after before_resume()
    assert "clock_realtime" not in load  # kvmclock resumes where it was, as under QEMU


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PATCH", "/vm", {"state": "Running"}),  # not one of Paused, Resumed
    ("PUT", "/vm", {"state": "Paused"}),  # /vm takes PATCH only
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_backend": {"backend_type": "File", "path": "m"}}),
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "network_overrides": [{"iface_id": "a", "host_dev": "t"}]}),
    ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file": "m"}),
    ("PATCH", "/drives/overlay", {"drive_id": "overlay", "is_read_only": False}),  # not a PartialDrive field
    ("PUT", "/snapshots/load", {"snapshot_path": "s"}),
])
def test_a_request_firecracker_would_refuse_is_caught(method: str, path: str, body: object) -> None:
    with pytest.raises((jsonschema.ValidationError, AssertionError)):
        validate_request(method, path, body)
