"""`browservm vm ...` and `browservm serve`: the argument parsing and output of the VM commands."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable

from browservm.config import Settings
from browservm.controller import Controller, open_controller
from browservm.progress import Progress
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmm import process
from browservm.vmm.process import VmmProcess


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    vm = commands.add_parser("vm", help="browser VMs: create, list, show, console, remove")
    actions = vm.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[common], help="boot a VM; returns when its desktop answers")
    create.add_argument("--user", default="default", help="whose VM it is (limits count per user)")
    create.add_argument("--vcpus", type=int, default=1)
    create.add_argument("--mem", type=int, default=1024, metavar="MiB")
    create.add_argument("--keep-failed", action="store_true",
                        help="keep a failed VM's VMM, TAP, lease and disk for diagnosis")
    create.add_argument("--boot-arg", action="append", default=[], metavar="WORD",
                        help="an extra kernel argument (repeatable)")
    actions.add_parser("ls", parents=[common], help="every VM with its state, address and VMM")
    show = actions.add_parser("show", parents=[common], help="one VM in full, with the time of each stage")
    show.add_argument("vm_id")
    console = actions.add_parser("console", parents=[common], help="the VM's serial console")
    console.add_argument("vm_id")
    console.add_argument("--lines", type=int, default=50, help="how many of the last lines (default 50)")
    console.add_argument("--follow", action="store_true", help="keep printing new lines")
    remove = actions.add_parser("rm", parents=[common], help="destroy VMs (idempotent)")
    remove.add_argument("vm_ids", nargs="+", metavar="VM_ID")


def run(args: argparse.Namespace, settings: Settings) -> int:
    with open_controller(settings) as controller:
        actions: dict[str, Callable[[Controller, argparse.Namespace], int]] = {
            "create": _create, "ls": _list, "show": _show, "console": _console, "rm": _remove}
        return actions[args.action](controller, args)


def _create(controller: Controller, args: argparse.Namespace) -> int:
    controller.manager.check_request(args.user, args.vcpus, args.mem, tuple(args.boot_arg))
    progress = Progress()
    changes = [c for c in controller.network.up() if c.action != "unchanged"]
    for change in changes:
        progress.note(f"host network: {change.action} {change.piece}")

    def stage(name: str, seconds: float) -> None:
        print(f"  [{seconds:7.2f}s] {name}", file=sys.stderr, flush=True)

    # Ctrl-C cancels the create, which releases what it made, as for any failure.
    record = asyncio.run(controller.manager.create(
        args.user, args.vcpus, args.mem, keep_failed=args.keep_failed, extra_boot_args=tuple(args.boot_arg),
        on_stage=stage))
    _print_record(record, args.json)
    return 0 if record.state == VmState.READY else 1


def _alive(record: VmRecord) -> bool:
    return (record.pid is not None and record.pid_start_time is not None
            and process.alive(VmmProcess(record.pid, record.pid_start_time)))


def _list(controller: Controller, args: argparse.Namespace) -> int:
    records = asyncio.run(controller.manager.all())
    if args.json:
        print(json.dumps([{**r.to_json(), "vmm_alive": _alive(r)} for r in records], indent=2))
        return 0
    print(f"{'ID':<16} {'STATE':<10} {'USER':<12} {'ADDRESS':<18} {'TAP':<16} {'PID':<8} UPTIME")
    for r in records:
        pid = "-" if r.pid is None else (str(r.pid) if _alive(r) else f"{r.pid}!")
        uptime = f"{time.time() - r.created_at:.0f}s" if _alive(r) else "-"
        print(f"{r.vm_id:<16} {r.state.value:<10} {r.user[:12]:<12} {r.address or '-':<18} {r.tap or '-':<16} "
              f"{pid:<8} {uptime}")
    return 0


def _show(controller: Controller, args: argparse.Namespace) -> int:
    record = asyncio.run(controller.manager.get(args.vm_id))
    if record is None:
        print(f"browservm: no VM {args.vm_id}", file=sys.stderr)
        return 1
    _print_record(record, args.json)
    return 0


def _print_record(record: VmRecord, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**record.to_json(), "vmm_alive": _alive(record)}, indent=2))
        return
    print(f"{record.vm_id}: {record.state.value}")
    for label, value in (("user", record.user), ("address", record.address), ("gateway", record.gateway),
                         ("tap", record.tap), ("mac", record.mac), ("bridge", record.bridge),
                         ("vmm", f"{record.driver} ({record.accel})"),
                         ("network", f"configured by the {record.guest_network_by or '?'}"),
                         ("pid", f"{record.pid} ({'alive' if _alive(record) else 'not running'})"),
                         ("uptime", f"{time.time() - record.created_at:.0f} s" if _alive(record) else "-"),
                         ("directory", record.directory)):
        print(f"  {label:<10} {value}")
    if record.stages:
        print("  stages     " + "  ".join(f"{name} {seconds:.2f}s" for name, seconds in record.stages.items()))
    if record.failure is not None:
        failure = record.failure
        print(f"\n  failed at  {failure.hop}\n  reason     {failure.reason}\n  hint       {failure.hint}")
        for problem in failure.cleanup:
            print(f"  cleanup    {problem} (still held: `vm rm {record.vm_id}` tries again)")
        if failure.evidence:
            print("  console (last lines):")
            for line in failure.evidence:
                print(f"    {line}")


def _console(controller: Controller, args: argparse.Namespace) -> int:
    console = controller.manager.console(args.vm_id)
    if not console.path.exists():
        print(f"browservm: no console log for {args.vm_id} ({console.path})", file=sys.stderr)
        return 1
    for line in console.tail(args.lines):
        print(line)
    if args.follow:
        def show(line: str) -> bool:
            print(line, flush=True)
            return False
        try:
            asyncio.run(console.wait_for(show, float("inf")))
        except KeyboardInterrupt:
            return 0
    return 0


def _remove(controller: Controller, args: argparse.Namespace) -> int:
    results = {vm_id: asyncio.run(controller.manager.destroy(vm_id)) for vm_id in args.vm_ids}
    if args.json:
        print(json.dumps({vm_id: "removed" if done else "absent" for vm_id, done in results.items()}))
    else:
        for vm_id, done in results.items():
            print(f"{vm_id}: {'removed' if done else 'no such VM (nothing to do)'}")
    return 0
