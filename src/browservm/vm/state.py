"""A VM's life as states, with one guarded way to move between them.

    creating ──► booting ──► ready
        │           │          │
        └───────────┴──────────┴──► failed
        └───────────┴──────────┴──────┴──► destroying ──► (the record is gone)
                                                   └──► ended  (stopped on purpose, e.g. reaped;
                                                                the record stays to say why)
"""

from __future__ import annotations

import enum

from browservm.errors import StateError


class VmState(enum.Enum):
    CREATING = "creating"  # resources being allocated
    BOOTING = "booting"  # the VMM runs; readiness hops not all passed yet
    READY = "ready"  # every hop passed: the desktop answers RFB
    FAILED = "failed"  # a hop failed or the VMM died; `failure` says which and why
    DESTROYING = "destroying"
    ENDED = "ended"  # stopped on purpose and released; `ended_reason` says why


_ALLOWED = {
    VmState.CREATING: {VmState.BOOTING, VmState.FAILED, VmState.DESTROYING},
    VmState.BOOTING: {VmState.READY, VmState.FAILED, VmState.DESTROYING},
    VmState.READY: {VmState.FAILED, VmState.DESTROYING},
    VmState.FAILED: {VmState.DESTROYING},
    VmState.DESTROYING: {VmState.DESTROYING, VmState.ENDED},  # an interrupted destroy is simply run again
    VmState.ENDED: {VmState.DESTROYING},
}


def transition(vm_id: str, current: VmState, new: VmState) -> VmState:
    if new not in _ALLOWED[current]:
        raise StateError(f"VM {vm_id}", f"cannot go from {current.value} to {new.value}")
    return new
