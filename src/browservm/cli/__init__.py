"""The `browservm` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from ipaddress import IPv4Network
from pathlib import Path

from browservm import __version__
from browservm.cli import audit as audit_cli
from browservm.cli import cluster as cluster_cli
from browservm.cli import doctor as doctor_cli
from browservm.cli import image as image_cli
from browservm.cli import kernel as kernel_cli
from browservm.cli import keys as keys_cli
from browservm.cli import login as login_cli
from browservm.cli import serve as serve_cli
from browservm.cli import tenants as tenants_cli
from browservm.cli import vm as vm_cli
from browservm.cli.client import ControllerError
from browservm.config import Settings, load_settings
from browservm.controller import host_network
from browservm.errors import BrowserVMError, InvalidInput, OperationFailed
from browservm.hostnet.host import Change, Check
from browservm.images.rootfs import PROFILES
from browservm.store import Store
from browservm.vmm.accel import AccelProbe
from browservm.vmm.qemu import QEMU


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--netns", metavar="NAME",
                        help="put the VM network in this network namespace (created if missing)")
    common.add_argument("--state-dir", metavar="DIR", help="durable state (default /var/lib/browservm)")
    common.add_argument("--subnet", metavar="CIDR", help="VM subnet (default 192.168.100.0/24)")
    common.add_argument("--bridge", metavar="NAME", help="bridge name (default br0)")
    common.add_argument("--uplink", metavar="IFACE", help="interface VM traffic is masqueraded to")
    common.add_argument("--egress-allow", metavar="CIDR", action="append",
                        help="let VMs reach this otherwise blocked range through the uplink (repeatable)")
    common.add_argument("--egress-deny", metavar="CIDR", action="append",
                        help="never let VMs reach this range (repeatable; wins over --egress-allow)")
    common.add_argument("--adopt-bridge", action="store_true", default=None,
                        help="use a bridge browservm did not create (it may be this host's LAN bridge: careful)")
    common.add_argument("--vmm-user", metavar="USER", help="user that owns the TAPs (default root)")
    common.add_argument("--guest-port", metavar="PORT", type=int, action="append", dest="guest_ports",
                        help="TCP port on the gateway that VMs may reach (repeatable)")
    common.add_argument("--vmm", choices=("auto", "firecracker", "qemu"),
                        help="VMM driver (default auto: Firecracker where it can run, else QEMU)")
    common.add_argument("--accel", choices=("auto", "kvm", "tcg"),
                        help="QEMU's accelerator (default auto: KVM only where a probe guest runs under it to the "
                             "end, else TCG)")
    common.add_argument("--desktop-path", choices=("rfb", "websockify"),
                        help="how the controller reaches new VMs' desktops: rfb (the VNC server on :5901, the "
                             "default) or websockify (:6080, the seed's way)")
    common.add_argument("--kernel", metavar="VMLINUX", type=Path, help="guest kernel (default: build ours)")
    common.add_argument("--rootfs", metavar="IMAGE", type=Path, help="golden image (default: build ours)")
    common.add_argument("--profile", choices=tuple(PROFILES), dest="image_profile",
                        help="image to build when --rootfs is not given (default full, with Chromium)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="browservm", description="Isolated browser microVMs.")
    parser.add_argument("--version", action="version", version=f"browservm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    common = _common_options()

    host = commands.add_parser("host", help="the host network: bridge, nftables, forwarding")
    host_commands = host.add_subparsers(dest="action", required=True)
    host_commands.add_parser("up", parents=[common], help="create what is missing (idempotent)")
    host_commands.add_parser("status", parents=[common], help="check each piece; exit 1 if any is wrong")
    down = host_commands.add_parser("down", parents=[common], help="remove what `host up` created")
    down.add_argument("--force", action="store_true", help="also delete VM TAPs and release their leases")
    cluster_cli.add_host_actions(host_commands, common)

    kernel_cli.add_parser(commands)
    image_cli.add_parser(commands, common)
    vm_cli.add_parser(commands, common)
    serve_cli.add_parser(commands, common)
    login_cli.add_parser(commands, common)
    doctor_cli.add_parser(commands, common)
    cluster_cli.add_parser(commands)
    keys_cli.add_parser(commands, common)
    tenants_cli.add_parser(commands, common)
    audit_cli.add_parser(commands, common)
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    subnet = None
    if args.subnet is not None:
        try:
            subnet = IPv4Network(args.subnet)
        except ValueError as exc:
            raise InvalidInput("subnet", args.subnet, str(exc)) from None
    service = {name: getattr(args, name, None) for name in (
        "listen", "public_url", "idle_timeout", "max_lifetime", "viewer_ttl", "stop_vms_on_exit", "adopt_bridge",
        "snapshots", "pool", "templates", "log_format", "tls_cert", "tls_key", "ca_file", "audit_retention")}
    for name in ("egress_allow", "egress_deny"):
        if getattr(args, name, None):
            service[name] = ",".join(getattr(args, name))
    return load_settings(netns=args.netns, state_dir=args.state_dir, subnet=subnet, bridge=args.bridge,
                         uplink=args.uplink, vmm_user=args.vmm_user,
                         guest_ports=tuple(args.guest_ports) if args.guest_ports else None,
                         vmm=args.vmm, kernel=args.kernel, rootfs=args.rootfs, image_profile=args.image_profile,
                         desktop_path=args.desktop_path, accel=args.accel, **service)


def _print_changes(changes: list[Change], as_json: bool) -> int:
    if as_json:
        print(json.dumps({"changes": [dataclasses.asdict(c) for c in changes]}, indent=2))
    else:
        for change in changes:
            print(f"{change.action:<10} {change.piece}" + (f"  ({change.detail})" if change.detail else ""))
    return 0


def _print_checks(checks: list[Check], as_json: bool) -> int:
    healthy = all(check.ok for check in checks)
    if as_json:
        print(json.dumps({"ok": healthy, "checks": [dataclasses.asdict(c) for c in checks]}, indent=2))
    else:
        for check in checks:
            print(f"{'ok' if check.ok else 'FAIL':<5} {check.piece:<36} {check.detail}")
    return 0 if healthy else 1


def _accelerator(settings: Settings) -> Check:
    """Not the network's, but what a new host's first VM depends on: which accelerator, and why."""
    if settings.vmm == "firecracker":
        return Check("accelerator", True, "kvm: Firecracker runs guests only under KVM")
    return Check("accelerator", True, AccelProbe(QEMU, settings.accel).summary())


def _host(args: argparse.Namespace) -> int:
    if args.action in ("drain", "resume"):
        return cluster_cli.run_host(args, load_settings())
    settings = _settings(args)
    if args.action == "join":
        return cluster_cli.run_host(args, settings)
    with Store(settings.database) as store, host_network(settings, store) as network:
        actions: dict[str, Callable[[], int]] = {
            "up": lambda: _print_changes(network.up(), args.json),
            "status": lambda: _print_checks([*network.status(), _accelerator(settings)], args.json),
            "down": lambda: _print_changes(network.down(force=args.force), args.json),
        }
        return actions[args.action]()


def _report_error(exc: BrowserVMError, as_json: bool) -> None:
    if as_json:
        if isinstance(exc, ControllerError):  # the controller's own error object, as it sent it
            print(json.dumps({"error": exc.body}, indent=2))
            return
        fields = {k: v for k, v in vars(exc).items() if isinstance(v, (str, int, float, type(None)))}
        print(json.dumps({"error": {"type": type(exc).__name__, "message": str(exc), **fields}}, indent=2))
    else:
        print(f"browservm: error: {exc}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        commands: dict[str, Callable[[argparse.Namespace], int]] = {
            "host": _host, "kernel": kernel_cli.run, "image": lambda a: image_cli.run(a, _settings(a)),
            "vm": lambda a: vm_cli.run(a, _settings(a)), "serve": lambda a: serve_cli.run(_settings(a)),
            "doctor": lambda a: doctor_cli.run(a, _settings(a)), "login": lambda a: login_cli.run(a, _settings(a)),
            "cluster": cluster_cli.run, "key": lambda a: keys_cli.run(a, _settings(a)),
            "tenant": lambda a: tenants_cli.run(a, _settings(a)), "audit": lambda a: audit_cli.run(a, _settings(a))}
        return commands[args.command](args)
    except BrowserVMError as exc:
        _report_error(exc, getattr(args, "json", False))
        return 2 if isinstance(exc, InvalidInput) else 1
    except OSError as exc:  # disk full, permission denied, a missing program: a reason, not a traceback
        _report_error(OperationFailed(args.command, exc), getattr(args, "json", False))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
