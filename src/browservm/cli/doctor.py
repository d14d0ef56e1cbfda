"""`browservm doctor [VM_ID]`: the argument parsing and output of the diagnosis (browservm.doctor).

Exit codes: 0 when the verdict is OK or WARN, 1 when something is broken (FAIL), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from contextlib import ExitStack

from browservm.config import Settings
from browservm.controller import jailer_options
from browservm.doctor import Doctor, Report, render_text
from browservm.doctor.local import plan_of, sources
from browservm.hostnet.host import HostNetwork
from browservm.hostnet.netns import NetworkNamespace
from browservm.store import Store
from browservm.vm.records import VmRecords
from browservm.vmm import firecracker


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser],
               common: argparse.ArgumentParser) -> None:
    doctor = commands.add_parser(
        "doctor", parents=[common],
        help="read-only diagnosis: the host's pieces, or one VM's hops in order, naming the broken one with "
             "its evidence and the fix")
    doctor.add_argument("vm_id", nargs="?", metavar="VM_ID", help="the VM to diagnose (default: the host)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    report = asyncio.run(diagnose(settings, args.vm_id))
    print(json.dumps(report.to_json(), indent=2) if args.json else render_text(report))
    return 1 if report.verdict == "FAIL" else 0


async def diagnose(settings: Settings, vm_id: str | None) -> Report:
    with ExitStack() as stack:
        network = records = None
        # Without a database there is nothing of ours to compare with: do not create one by looking.
        if settings.database.exists():
            store = stack.enter_context(Store(settings.database))
            network = stack.enter_context(HostNetwork(plan_of(settings), store, NetworkNamespace(settings.netns),
                                                      tap_owner=settings.vmm_ids))
            records = VmRecords(store)
        options = jailer_options(settings)
        jail = None if options is None else (lambda vm: firecracker.jail_root(vm, options))
        doctor = Doctor(sources(settings, network=network, records=records, jail_root=jail))
        return await (doctor.host() if vm_id is None else doctor.vm(vm_id))
