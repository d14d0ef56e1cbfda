"""What the VM commands print, from a VM's JSON view: local mode's record_view() or the API's VmOut.

One set of printers for both modes (vm.py drives VMs in this process, remote.py asks a controller),
so `--json` and the human lines agree field by field. `vmm_alive` is in local views only (checked
by PID and start time); a remote view has what the controller recorded, with `uptime_s` (its
clock) instead. Lines for fields a view lacks (the API does not report gateway, bridge, guest
network, directory) are left out.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from browservm.vm.console import terminal_safe
from browservm.vm.state import VmState

_LIVE = (VmState.CREATING.value, VmState.BOOTING.value, VmState.READY.value)


def print_stage(name: str, seconds: float) -> None:
    """One line per stage as it passes, on stderr so --json output stays clean."""
    print(f"  [{seconds:7.2f}s] {name}", file=sys.stderr, flush=True)


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
            ("user", "user", view["user"]), ("host", "host", view.get("host")),
            ("address", "address", view.get("address")),
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


def print_removed(results: dict[str, bool], as_json: bool) -> None:
    if as_json:
        print(json.dumps({vm_id: "removed" if done else "absent" for vm_id, done in results.items()}))
    else:
        for vm_id, done in results.items():
            print(f"{vm_id}: {'removed' if done else 'no such VM (nothing to do)'}")


def print_note(kind: str, detail: str, seconds: float) -> None:
    """A build step or retry a create waits through, on stderr as print_stage's lines are."""
    print(f"  [{seconds:7.2f}s] {kind:<8} {terminal_safe(detail)}", file=sys.stderr, flush=True)
