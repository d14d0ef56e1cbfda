"""`browservm vm ...`: the argument parsing and output of the VM commands.

Two modes, one output. Without `--url` the commands drive VMs in this process (the manager, as
`serve` runs it); with `--url URL` (or BROWSERVM_URL) they ask a running controller over its REST
API (remote.py). Both print from the same JSON view of a VM, so `--json` and the human lines agree
field by field; remote.py names the few fields only one side has.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from browservm.config import Settings
from browservm.controller import Controller, open_controller
from browservm.errors import InvalidInput
from browservm.progress import Progress
from browservm.vm.console import terminal_safe
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmm import process
from browservm.vmm.process import VmmProcess

_LIVE = (VmState.CREATING.value, VmState.BOOTING.value, VmState.READY.value)


class OptionUnavailable(InvalidInput):
    """An option (or command) this mode does not offer: local mode has no viewer, the API no --keep-failed."""

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(option, None, reason)

    def __str__(self) -> str:
        return self.reason  # "(got None)" would say nothing here


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--url", metavar="URL",
                        help="ask the controller at URL (`browservm serve`) instead of driving VMs in this process "
                             "(also BROWSERVM_URL; the API key is <state-dir>/api.key or BROWSERVM_API_KEY)")
    parents = [common, remote]
    vm = commands.add_parser("vm", help="browser VMs: create, list, show, console, viewer, remove")
    actions = vm.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=parents, help="boot a VM; returns when its desktop answers")
    create.add_argument("--user", default="default", help="whose VM it is (limits count per user)")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--mem", type=int, default=1024, metavar="MiB")
    create.add_argument("--keep-failed", action="store_true",
                        help="keep a failed VM's VMM, TAP, lease and disk for diagnosis (local mode only)")
    create.add_argument("--boot-arg", action="append", default=[], metavar="WORD",
                        help="an extra kernel argument (repeatable; local mode only)")
    actions.add_parser("ls", parents=parents, help="every VM with its state, address and VMM")
    show = actions.add_parser("show", parents=parents, help="one VM in full, with the time of each stage")
    show.add_argument("vm_id")
    console = actions.add_parser("console", parents=parents, help="the VM's serial console")
    console.add_argument("vm_id")
    console.add_argument("--lines", type=int, default=50, help="how many of the last lines (default 50)")
    console.add_argument("--follow", action="store_true", help="keep printing new lines (local mode only)")
    viewer = actions.add_parser("viewer", parents=parents,
                                help="a link that opens the VM's desktop in a browser (needs --url)")
    viewer.add_argument("vm_id")
    remove = actions.add_parser("rm", parents=parents, help="destroy VMs (idempotent)")
    remove.add_argument("vm_ids", nargs="+", metavar="VM_ID")


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url if args.url is not None else os.environ.get("BROWSERVM_URL", "")
    if url:
        # Imported here, not at the top: remote.py prints with this module's functions.
        from browservm.cli import remote  # noqa: PLC0415
        return remote.run(args, settings, url)
    if args.action == "viewer":
        # Checked before the controller is opened: saying this needs no root and no state directory.
        raise OptionUnavailable("url", "`vm viewer` needs --url URL (or BROWSERVM_URL): viewer links are made and "
                                       "served by a running controller (`browservm serve`), not by this command")
    with open_controller(settings) as controller:
        actions: dict[str, Callable[[Controller, argparse.Namespace], int]] = {
            "create": _create, "ls": _list, "show": _show, "console": _console, "rm": _remove}
        return actions[args.action](controller, args)


def print_stage(name: str, seconds: float) -> None:
    """One line per stage as it passes, on stderr so --json output stays clean."""
    print(f"  [{seconds:7.2f}s] {name}", file=sys.stderr, flush=True)


def _create(controller: Controller, args: argparse.Namespace) -> int:
    controller.manager.check_request(args.user, args.vcpus, args.mem, tuple(args.boot_arg))
    progress = Progress()
    changes = [c for c in controller.network.up() if c.action != "unchanged"]
    for change in changes:
        progress.note(f"host network: {change.action} {change.piece}")
    # Ctrl-C cancels the create, which releases what it made, as for any failure.
    record = asyncio.run(controller.manager.create(
        args.user, args.vcpus, args.mem, keep_failed=args.keep_failed, extra_boot_args=tuple(args.boot_arg),
        on_stage=print_stage))
    print_vm(record_view(record), args.json)
    return 0 if record.state == VmState.READY else 1


def _alive(record: VmRecord) -> bool:
    return (record.pid is not None and record.pid_start_time is not None
            and process.alive(VmmProcess(record.pid, record.pid_start_time)))


def record_view(record: VmRecord) -> dict[str, Any]:
    """What local mode prints for a VM (`--json`, and the human lines are made from it)."""
    return {**record.to_json(), "vmm_alive": _alive(record)}


def _list(controller: Controller, args: argparse.Namespace) -> int:
    print_vms([record_view(r) for r in asyncio.run(controller.manager.all())], args.json)
    return 0


def _show(controller: Controller, args: argparse.Namespace) -> int:
    record = asyncio.run(controller.manager.get(args.vm_id))
    if record is None:
        print(f"browservm: no VM {args.vm_id}", file=sys.stderr)
        return 1
    print_vm(record_view(record), args.json)
    return 0


# --- output, from a VM's JSON view: local mode's record_view() or the API's VmOut --------------
#
# `vmm_alive` is in local views only (checked here, by PID and start time); a remote view has
# what the controller recorded, with `uptime_s` (its clock) instead. Lines for fields a view
# lacks (the API does not report gateway, bridge, guest network, directory) are left out.


def _pid_and_uptime(view: dict[str, Any]) -> tuple[str, str, str]:
    """The PID for `ls`, the PID for `show`, and the uptime."""
    pid = view.get("pid")
    alive = view.get("vmm_alive")
    if alive is None:  # remote: the controller watches each VMM and marks its VM failed when it exits
        uptime = f"{view.get('uptime_s', 0.0):.0f}" if view.get("state") in _LIVE else ""
        return ("-" if pid is None else str(pid), "-" if pid is None else f"{pid} (as the controller recorded it)",
                uptime)
    uptime = f"{time.time() - view['created_at']:.0f}" if alive else ""
    return ("-" if pid is None else (str(pid) if alive else f"{pid}!"),
            f"{pid} ({'alive' if alive else 'not running'})", uptime)


def print_vms(views: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(views, indent=2))
        return
    print(f"{'ID':<16} {'STATE':<10} {'USER':<12} {'ADDRESS':<18} {'TAP':<16} {'PID':<8} UPTIME")
    for v in views:
        pid, _, uptime = _pid_and_uptime(v)
        print(f"{v['vm_id']:<16} {v['state']:<10} {v['user'][:12]:<12} {v['address'] or '-':<18} "
              f"{v['tap'] or '-':<16} {pid:<8} {uptime + 's' if uptime else '-'}")


def print_vm(view: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(view, indent=2))
        return
    _, pid, uptime = _pid_and_uptime(view)
    print(f"{view['vm_id']}: {view['state']}")
    network_by = view.get("guest_network_by")
    for label, key, value in (
            ("user", "user", view["user"]), ("address", "address", view.get("address")),
            ("gateway", "gateway", view.get("gateway")), ("tap", "tap", view.get("tap")),
            ("mac", "mac", view.get("mac")), ("bridge", "bridge", view.get("bridge")),
            ("vmm", "driver", f"{view.get('driver')} ({view.get('accel') or 'accelerator not chosen yet'})"),
            ("accel", "accel_reason", view.get("accel_reason")),
            ("network", "guest_network_by", f"configured by the {network_by or '?'}"),
            ("started", "started_from", view.get("started_from", "cold") + (
                f" from snapshot {view['snapshot']}" if view.get("snapshot") else "")),
            ("desktop", "desktop_path", view.get("desktop_path")),
            ("pid", "pid", pid), ("uptime", "created_at", f"{uptime} s" if uptime else "-"),
            ("directory", "directory", view.get("directory")),
            ("viewers", "viewers", _viewers(view)), ("ended", "ended_reason", view.get("ended_reason"))):
        if key in view and (label not in ("ended", "accel") or value):
            print(f"  {label:<10} {value}")
    if view.get("building"):
        print(f"  building   {view['building']}")
    retried = view.get("retried_after")
    if retried:
        print(f"  retried    under TCG, after {retried['hop']} under {retried['accel']}: "
              f"{terminal_safe(retried['reason'])}")
    if view.get("stages"):
        print("  stages     " + "  ".join(f"{name} {seconds:.2f}s" for name, seconds in view["stages"].items()))
    failure = view.get("failure")
    if failure is not None:
        print(f"\n  failed at  {failure['hop']}\n  reason     {terminal_safe(failure['reason'])}\n"
              f"  hint       {failure['hint']}")
        for problem in failure["cleanup"]:
            print(f"  cleanup    {problem} (still held: `vm rm {view['vm_id']}` tries again)")
        for title, lines in (("console", failure["evidence"]), ("the VMM's own log", failure.get("vmm_log", ()))):
            if lines:
                print(f"  {title} (last lines):")
                for line in lines:
                    print(f"    {terminal_safe(line)}")


def _viewers(view: dict[str, Any]) -> str:
    idle = view.get("idle_s")
    return f"{view.get('viewers')} connected" + (f", none for {idle:.0f} s" if idle is not None else "")


def _console(controller: Controller, args: argparse.Namespace) -> int:
    console = controller.manager.console(args.vm_id)
    if not console.path.exists():
        print(f"browservm: no console log for {args.vm_id} ({console.path})", file=sys.stderr)
        return 1
    for line in console.tail(args.lines):
        print(terminal_safe(line))
    if args.follow:
        def show(line: str) -> bool:
            print(terminal_safe(line), flush=True)
            return False
        try:
            asyncio.run(console.wait_for(show, float("inf")))
        except KeyboardInterrupt:
            return 0
    return 0


def print_removed(results: dict[str, bool], as_json: bool) -> None:
    if as_json:
        print(json.dumps({vm_id: "removed" if done else "absent" for vm_id, done in results.items()}))
    else:
        for vm_id, done in results.items():
            print(f"{vm_id}: {'removed' if done else 'no such VM (nothing to do)'}")


def _remove(controller: Controller, args: argparse.Namespace) -> int:
    print_removed({vm_id: asyncio.run(controller.manager.destroy(vm_id)) for vm_id in args.vm_ids}, args.json)
    return 0
