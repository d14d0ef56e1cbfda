"""`browservm doctor`: read-only diagnosis over the same hops the manager records (vm/hops.py).

    run.py       the Doctor: the host's pieces, one VM's hops in order, each with a deadline
    props.py     every property `host up` and `vm create` set, against what is there (hostnet/expected.py)
    hostview.py  the read-only snapshot of the VM network's namespace (hostnet/observed.py), and other
                 programs' firewall rules that would drop VM traffic
    vmmview.py   what a running VMM actually uses (QEMU's command line, Firecracker's config)
    images.py    the kernel (`kernel inspect`) and the image (debugfs, read-only) a guest boots with
    causes.py    the stable cause codes and their fixes
    report.py    results, verdict, JSON and text
    local.py     the doctor's sources from settings, for the CLI and the service
"""

from browservm.doctor.report import Report, render_text
from browservm.doctor.run import Deadlines, Doctor, DriverVmms, Sources

__all__ = ["Deadlines", "Doctor", "DriverVmms", "Report", "Sources", "render_text"]
