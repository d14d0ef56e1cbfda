"""`browservm vm ...`: the argument parsing of the VM commands, which mode runs them, and local mode.

Two modes, one output (output.py). Without `--url` the commands drive VMs in this process (the
manager, as `serve` runs it; below); with `--url URL` (or BROWSERVM_URL) they ask a running
controller over its REST API (remote.py). Both print from the same JSON view of a VM, so `--json`
and the human lines agree field by field; remote.py names the few fields only one side has. The
options only one mode offers are refused here, before either starts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from browservm.cli import remote
from browservm.cli.client import CA_FILE_HELP, parse_url
from browservm.cli.labels import labels_of
from browservm.cli.output import print_removed, print_stage, print_vm, print_vms
from browservm.config import Settings
from browservm.controller import Controller, open_controller
from browservm.errors import InvalidInput
from browservm.progress import Progress
from browservm.vm.console import terminal_safe
from browservm.vm.create import normalise_user
from browservm.vm.records import Owner, VmRecord
from browservm.vm.state import VmState
from browservm.vmm import process
from browservm.vmm.process import VmmProcess


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
    remote.add_argument("--ca-file", type=Path, metavar="PEM", help=CA_FILE_HELP)
    parents = [common, remote]
    vm = commands.add_parser("vm", help="browser VMs: create, list, show, console, viewer, extend, remove")
    actions = vm.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=parents, help="boot a VM; returns when its desktop answers")
    create.add_argument("--user", default="default", help="whose VM it is (limits count per user)")
    create.add_argument("--template", default="default",
                        help="what the VM is made from: its image, size and desktop path (default: default; "
                             "the controller's --templates file, BROWSERVM_TEMPLATES, adds more)")
    create.add_argument("--vcpus", type=int, help="default: the template's (1 for default)")
    create.add_argument("--mem", type=int, metavar="MiB", help="default: the template's (1024 for default)")
    create.add_argument("--keep-failed", action="store_true",
                        help="keep a failed VM's VMM, TAP, lease and disk for diagnosis (local mode only)")
    create.add_argument("--boot-arg", action="append", default=[], metavar="WORD",
                        help="an extra kernel argument (repeatable; local mode only)")
    create.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                        help="a label to find the VM by (repeatable, at most 16)")
    create.add_argument("--timeout", type=int, metavar="SECONDS",
                        help="end the VM this long after its creation (a controller's reaper ends it; "
                             "`vm extend` moves it)")
    create.add_argument("--browser-profile", choices=("ephemeral", "persistent"),
                        help="persistent: the user's browser profile (sign-ins, cookies) is loaded at the start and "
                             "saved at the end, one VM at a time (needs --url; default ephemeral)")
    listing = actions.add_parser("ls", parents=parents, help="every VM with its state, address and VMM")
    listing.add_argument("--user", help="only this user's")
    listing.add_argument("--state", choices=[state.value for state in VmState], help="only those in this state")
    listing.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                         help="only those with this label (repeatable: all of them)")
    extend = actions.add_parser("extend", parents=parents, help="end a VM SECONDS from now instead (needs --url)")
    extend.add_argument("vm_id")
    extend.add_argument("seconds", type=int)
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
        parse_url(url)  # a bad --url is named before any option
        _local_only(args)
        return remote.run(args, settings, url)
    if args.action == "viewer":
        # Checked before the controller is opened: saying this needs no root and no state directory.
        raise OptionUnavailable("url", "`vm viewer` needs --url URL (or BROWSERVM_URL): viewer links are made and "
                                       "served by a running controller (`browservm serve`), not by this command")
    if args.action == "extend":
        raise OptionUnavailable("url", "`vm extend` needs --url URL (or BROWSERVM_URL): a VM's timeout is kept by "
                                       "the controller that reaps it")
    if args.action == "create" and args.browser_profile == "persistent":
        raise OptionUnavailable("url", "`vm create --browser-profile persistent` needs --url URL (or BROWSERVM_URL): "
                                       "the controller keeps the profile, and saves it as the VM ends")
    with open_controller(settings) as controller:
        actions: dict[str, Callable[[Controller, argparse.Namespace], int]] = {
            "create": _create, "ls": _list, "show": _show, "console": _console, "rm": _remove}
        return actions[args.action](controller, args)


def _local_only(args: argparse.Namespace) -> None:
    """Refuse, with --url, the options only local mode offers."""
    if args.action == "create" and args.keep_failed:
        raise OptionUnavailable("keep_failed", "--keep-failed is for local mode (without --url): the controller's "
                                               "API does not take it")
    if args.action == "create" and args.boot_arg:
        raise OptionUnavailable("boot_arg", "--boot-arg is for local mode (without --url): the controller's API "
                                            "does not take it")
    if args.action == "console" and args.follow:
        raise OptionUnavailable("follow", "--follow is for local mode (without --url) on the controller's host: "
                                          "the API serves a console's last lines, not a stream of them; run "
                                          "`vm console` again for the newest")


def _create(controller: Controller, args: argparse.Namespace) -> int:
    template = controller.manager.template(args.template)
    controller.manager.check_request(args.user, template.vcpus if args.vcpus is None else args.vcpus,
                                     template.mem_mib if args.mem is None else args.mem, tuple(args.boot_arg))
    progress = Progress()
    changes = [c for c in controller.network.up() if c.action != "unchanged"]
    for change in changes:
        progress.note(f"host network: {change.action} {change.piece}")
    # Ctrl-C cancels the create, which releases what it made, as for any failure.
    owner = Owner(labels=labels_of(args.label), timeout_s=args.timeout)
    record = asyncio.run(controller.manager.create(
        args.user, args.vcpus, args.mem, keep_failed=args.keep_failed, extra_boot_args=tuple(args.boot_arg),
        on_stage=print_stage, owner=owner, template=template.name))
    print_vm(record_view(record), args.json)
    return 0 if record.state == VmState.READY else 1


def _alive(record: VmRecord) -> bool:
    return (record.pid is not None and record.pid_start_time is not None
            and process.alive(VmmProcess(record.pid, record.pid_start_time)))


def record_view(record: VmRecord) -> dict[str, Any]:
    """What local mode prints for a VM (`--json`, and the human lines are made from it)."""
    return {**record.to_json(), "vmm_alive": _alive(record)}


def _list(controller: Controller, args: argparse.Namespace) -> int:
    user, labels = None if args.user is None else normalise_user(args.user), labels_of(args.label)
    print_vms([record_view(r) for r in asyncio.run(controller.manager.all())
               if (user is None or r.user == user) and (args.state is None or r.state.value == args.state)
               and labels.items() <= r.labels.items()], args.json)
    return 0


def _show(controller: Controller, args: argparse.Namespace) -> int:
    record = asyncio.run(controller.manager.get(args.vm_id))
    if record is None:
        print(f"browservm: no VM {args.vm_id}", file=sys.stderr)
        return 1
    print_vm(record_view(record), args.json)
    return 0


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


def _remove(controller: Controller, args: argparse.Namespace) -> int:
    print_removed({vm_id: asyncio.run(controller.manager.destroy(vm_id)) for vm_id in args.vm_ids}, args.json)
    return 0
