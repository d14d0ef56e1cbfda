"""`browservm doctor`: read-only diagnosis over the same hops the manager records (vm/hops.py).

    run.py           the Doctor: the host's pieces, then one VM's hops in order
    host_network.py  the VM network's pieces on the host, judged from one read of them
    host_boot.py     what a VM would boot with: the VMM, the kernel, the image
    vm_walk.py       one VM's hops in order, from its record, its console and live probes
    deadlines.py     how long each step may take; blocking steps run in daemon threads held to it
    sources.py       where the doctor reads from: the plan, the store, `host status`, the VMMs
    props.py         every property `host up` and `vm create` set, against what is there (hostnet/expected.py)
    hostview.py      the read-only snapshot of the VM network's namespace (hostnet/observed.py), and other
                     programs' firewall rules that would drop VM traffic
    vmmview.py       what a running VMM actually uses (QEMU's command line, Firecracker's config)
    images.py        the kernel (`kernel inspect`) and the image (debugfs, read-only) a guest boots with
    causes.py        the stable cause codes and their fixes
    report.py        results, verdict, JSON and text
    local.py         the doctor's sources from settings, for the CLI and the service
"""

from browservm.doctor.deadlines import Deadlines
from browservm.doctor.report import Report, render_text
from browservm.doctor.run import Doctor
from browservm.doctor.sources import DriverVmms, Sources

__all__ = ["Deadlines", "Doctor", "DriverVmms", "Report", "Sources", "render_text"]
