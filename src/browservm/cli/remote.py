"""`browservm vm ... --url URL`: the VM commands against a running controller's REST API.

The controller (`browservm serve`) does the work; this side sends requests (browservm.client) and prints
the answers with output.py's printers, as local mode does, so a command prints the same in both
modes. What differs, on purpose:

- `vm create` posts the request, then follows the VM's Server-Sent Events (GET /v1/vms/{id}/events)
  and prints each stage on stderr as it passes; when the VM is ready it also prints a viewer link.
  Ctrl-C while it boots deletes the VM, as Ctrl-C cancels a local create.
- `vm viewer ID` exists only here: viewer links are signed and served by the controller.
- `vm console --follow` is refused (by vm.py): the API has the console's last lines, not a stream
  of them, and polling a tail cannot tell new lines from repeated ones.
- `--keep-failed` and `--boot-arg` are refused (by vm.py): the API does not take them.
- The host settings (--netns, --subnet, --kernel, ...) are the controller's own; here only
  --state-dir counts, for the API key.
- `--json` of a VM agrees with local mode field by field, except for LOCAL_ONLY and REMOTE_ONLY
  below; `vm create --json` adds `viewer` (the viewer link) when the VM is ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from browservm.cli import output
from browservm.cli.client import connect
from browservm.cli.labels import labels_of
from browservm.client import Client, NotFound, StreamEnded, VmFailed
from browservm.client.models import Vm
from browservm.config import Settings
from browservm.errors import BrowserVMError, WrongState
from browservm.ids import validate_vm_id
from browservm.vm.console import terminal_safe

# Fields of a VM's JSON that only one mode has (every other field agrees, by name and value).
# Local: what the record keeps that the API does not report, and the VMM checked alive by this process.
LOCAL_ONLY = frozenset({"directory", "gateway", "bridge", "guest_network_by", "pid_start_time", "failed_at",
                        "holds_resources", "keep", "owner", "viewer_epoch", "vmm_alive", "timeout_at"})
# Remote: what only a controller knows (uptime by its clock, viewers connected, time without one, when its
# reaper ends the VM) and the times again in RFC 3339.
REMOTE_ONLY = frozenset({"uptime_s", "viewers", "idle_s", "building", "expires_at", "expires_at_rfc3339",
                         "created_at_rfc3339"})


class ControllerStopped(BrowserVMError):
    def __init__(self, url: str, vm_id: str, state: str) -> None:
        self.url = url
        self.vm_id = vm_id
        self.state = state
        super().__init__(f"the controller at {url} ended the event stream while VM {vm_id} was {state} (is it "
                         f"stopping?); `browservm vm show {vm_id} --url {url}` tells what became of the VM")


# --- the commands --------------------------------------------------------------------------------


def run(args: argparse.Namespace, settings: Settings, url: str) -> int:
    """One command against the controller at `url` (checked, with the options, by vm.run)."""
    with connect(url, settings) as client:
        actions: dict[str, Callable[[Client, argparse.Namespace], int]] = {
            "create": _create, "ls": _list, "show": _show, "console": _console, "rm": _remove, "viewer": _viewer,
            "extend": _extend}
        return actions[args.action](client, args)


def follow(client: Client, vm_id: str, on_stage: Callable[[str, float], None],
           on_note: Callable[[str, str], None] = lambda kind, detail: None) -> Vm:
    """Report each stage of a booting VM once, as it passes, and each build step or retry it waits through
    (`on_note`, and "still" with the step when a build goes on for a quiet minute); its record once it is
    ready, failed or ended (client.wait_vm, told as the CLI tells it)."""
    try:
        return client.wait_vm(vm_id, on_stage=on_stage, on_note=on_note)
    except VmFailed as exc:
        if exc.vm is None:
            raise WrongState(vm_id, "deleted", "it was deleted (vm rm) while it was being created") from None
        return exc.vm
    except StreamEnded as exc:
        # No terminal event: the controller ends every stream when it stops; the VM boots on.
        raise ControllerStopped(client.base_url, vm_id, exc.state) from None


def _create(client: Client, args: argparse.Namespace) -> int:
    started = time.monotonic()
    vm_id = client.create_vm(args.user, args.vcpus, args.mem, labels=labels_of(args.label),
                             timeout_s=args.timeout, template=args.template, profile=args.browser_profile).vm_id
    print(f"browservm: {vm_id} is being created by {client.base_url} (Ctrl-C deletes it)", file=sys.stderr,
          flush=True)

    def note(kind: str, detail: str) -> None:
        # Build steps carry no time of their own (the build is the host's, not the VM's): ours, since the POST.
        output.print_note(kind, detail, time.monotonic() - started)

    try:
        vm = follow(client, vm_id, output.print_stage, note)
    except KeyboardInterrupt:
        # As a local create: Ctrl-C cancels it, and what was made is released.
        print(f"browservm: cancelled: removing VM {vm_id}", file=sys.stderr, flush=True)
        client.delete_vm(vm_id)
        raise
    ready = vm.state == "ready"
    record = vm.as_json()
    viewer = client.viewer(vm_id) if ready else None
    if args.json:
        output.print_vm({**record, "viewer": viewer.as_json()} if viewer else record, as_json=True)
        return 0 if ready else 1
    output.print_vm(record, as_json=False)
    if viewer is not None:
        until = time.strftime("%H:%M:%S", time.localtime(viewer.expires_at))
        print(f"  viewer     {viewer.url}\n             (open it in a browser before {until}; a new link: "
              f"browservm vm viewer {vm_id} --url {client.base_url})")
    return 0 if ready else 1


def _list(client: Client, args: argparse.Namespace) -> int:
    found = client.list_vms(user=args.user, state=args.state, labels=labels_of(args.label))
    output.print_vms([vm.as_json() for vm in found], args.json)
    return 0


def _extend(client: Client, args: argparse.Namespace) -> int:
    vm = client.extend_vm(validate_vm_id(args.vm_id), args.seconds)
    if args.json:
        output.print_vm(vm.as_json(), as_json=True)
    else:
        print(f"{vm.vm_id} ends at {vm.as_json().get('expires_at_rfc3339')}")
    return 0


def _show(client: Client, args: argparse.Namespace) -> int:
    try:
        vm = client.get_vm(args.vm_id)
    except NotFound:
        print(f"browservm: no VM {args.vm_id}", file=sys.stderr)  # as local mode says it
        return 1
    output.print_vm(vm.as_json(), args.json)
    return 0


def _console(client: Client, args: argparse.Namespace) -> int:
    for line in client.console(args.vm_id, args.lines):
        print(terminal_safe(line))
    return 0


def _viewer(client: Client, args: argparse.Namespace) -> int:
    viewer = client.viewer(args.vm_id)
    print(json.dumps(viewer.as_json(), indent=2) if args.json else viewer.url)
    return 0


def _remove(client: Client, args: argparse.Namespace) -> int:
    for vm_id in args.vm_ids:
        validate_vm_id(vm_id)  # all before any is removed
    output.print_removed({vm_id: client.delete_vm(vm_id) for vm_id in args.vm_ids}, args.json)
    return 0

