"""The errors of a cluster's record; each carries what a person needs to act on it."""

from __future__ import annotations

from browservm.errors import BrowserVMError


class PostgresError(BrowserVMError):
    """browservm's PostgreSQL could not be set up, started or stopped: `directory`, `step`, `reason`."""

    def __init__(self, directory: str, step: str, reason: str) -> None:
        self.directory = directory
        self.step = step
        self.reason = reason
        super().__init__(f"PostgreSQL in {directory}: {step}: {reason}")


class RecordUnavailable(BrowserVMError):
    """The cluster's database could not be reached: `conninfo`, `reason`."""

    def __init__(self, conninfo: str, reason: str) -> None:
        self.conninfo = conninfo
        self.reason = reason
        super().__init__(f"the cluster's database ({conninfo}) cannot be reached: {reason}")


class FencedOut(BrowserVMError):
    """An agent wrote with an epoch that is no longer its host's: a newer agent (or the host's loss) replaced it."""

    def __init__(self, host: str, epoch: int, current: int | None) -> None:
        self.host = host
        self.epoch = epoch
        self.current = current
        now = "the host is not registered" if current is None else f"the host's epoch is now {current}"
        super().__init__(f"host {host}: a write with agent epoch {epoch} refused ({now}); "
                         "this agent must stop, or register again and re-adopt its VMs")


class NoCapacity(BrowserVMError):
    """No host could take a VM: `reasons` says, per try, which host and why (or that none was ready)."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons
        super().__init__("no capacity for a new VM: " + "; ".join(reasons))


class HostRefused(BrowserVMError):
    """A host's agent refused a reservation placed on it (full, or failing): the front tries the next host."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"host {host} refused the VM: {reason}")


class RecordConflict(BrowserVMError):
    """A write found the record in another state than it needs: `what`, `reason`."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class HostError(BrowserVMError):
    """A host's agent could not do what a front asked: `host`, `reason` (a 502)."""

    def __init__(self, host: str, reason: str, message: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(message)


class HostUnreachable(HostError):
    """A host's agent could not be called (no such agent, it died, it did not answer)."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(host, reason, f"host {host} cannot be reached: {reason}")


class HostFailed(HostError):
    """A host's agent answered, with an error of its own."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(host, reason, f"host {host} answered with an error: {reason}")


class ClusterError(BrowserVMError):
    """A step of setting a cluster up (Ray's head, a host joining, a front) failed: `step`, `reason`."""

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"{step}: {reason}")


class Superseded(BrowserVMError):
    """A newer agent registered for this agent's host (after a partition, say): this one must end."""

    def __init__(self, host: str, epoch: int, current: int | None) -> None:
        self.host = host
        self.epoch = epoch
        self.current = current
        super().__init__(f"host {host}: the agent of epoch {epoch} was superseded by epoch {current}: it ends")
