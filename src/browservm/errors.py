"""Every error browservm raises on purpose, in one tree.

    BrowserVMError                      base; `str()` is a sentence a person can act on
    ├── InvalidInput (ValueError)       bad input: carries `field`, `value`, `reason`
    │   ├── InvalidVmId                 a VM id that may not reach a file or interface name
    │   └── BootArgsError               (guest/bootargs.py) a kernel argument the guest would misread
    ├── LimitExceeded                   a request over a configured limit: carries `limit`, `value`
    ├── StateError                      the state directory cannot be used (which file, why)
    │   ├── StateConflict               a VM's record changed under a writer: `vm_id`, `writing`, `found`
    │   └── AlreadyServed               another controller holds the state directory: `pid`
    ├── IpamError
    │   ├── PoolExhausted               every address of the subnet is leased
    │   └── NameCollision               two VM ids derive the same TAP name or MAC
    ├── HostNetworkError                a kernel object could not be made or checked:
    │                                   carries `netns`, `device`, `step`
    ├── CommandFailed                   a program could not run or exited non-zero:
    │                                   carries `command`, `returncode`, `log`, `detail`
    ├── KernelError
    │   ├── KernelImageError            a file is not a usable kernel image: carries `path`, `reason`
    │   └── KernelBuildError            a step of `kernel build` failed: carries `step`, `reason`, `log`
    │       └── KernelConfigDropped     olddefconfig dropped fragment options: carries `options`
    ├── ImageBuildError                 a step of `image build` or of a VM's disk: `step`, `reason`, `log`
    ├── VmmError                        a VMM could not be started, stopped or found: `vm_id`, `step`
    ├── ProbeFailed                     a hop to a VM's desktop did not answer: carries `hop`, `reason`
    ├── CleanupFailed                   releasing a VM's resources failed: `vm_id`, `errors` (one per resource)
    ├── OperationFailed                 an OS call failed outside any VM (disk full, permission denied):
    │                                   `operation`, `reason`, `path`
    ├── VmNotFound                      no VM with this id: `vm_id`
    └── WrongState                      the VM's state does not allow the request: `vm_id`, `state`, `reason`

The command line turns them into exit codes in one place (cli.main): 2 for
InvalidInput, 1 for the rest, with `--json` printing the fields.

The two roots, BrowserVMError and InvalidInput, are defined in guest/errors.py: the guest's
code raises them too (guest/bootargs.py), and the image carries the guest package alone. Import
them from here, as every other error of the tree.
"""

from __future__ import annotations

# Re-exported (PEP 484's `X as X`): this module is where host code finds every error of the tree.
from browservm.guest.errors import BrowserVMError as BrowserVMError  # noqa: PLC0414
from browservm.guest.errors import InvalidInput as InvalidInput  # noqa: PLC0414


class InvalidVmId(InvalidInput):
    def __init__(self, value: object, reason: str) -> None:
        super().__init__("vm_id", value, reason)


class StateError(BrowserVMError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"state {path}: {reason}")


class IpamError(BrowserVMError):
    pass


class PoolExhausted(IpamError):
    def __init__(self, subnet: str, leased: int) -> None:
        self.subnet = subnet
        self.leased = leased
        super().__init__(
            f"no free address in {subnet}: all {leased} usable addresses are leased; "
            "destroy a VM or configure a larger subnet"
        )


class NameCollision(IpamError):
    def __init__(self, vm_id: str, what: str, value: str, other_vm_id: str) -> None:
        self.vm_id = vm_id
        self.what = what
        self.value = value
        self.other_vm_id = other_vm_id
        super().__init__(
            f"VM {vm_id!r}: its {what} {value} is already used by VM {other_vm_id!r}; "
            "choose another VM id"
        )


class HostNetworkError(BrowserVMError):
    def __init__(self, step: str, reason: str, *, device: str | None = None,
                 netns: str | None = None) -> None:
        self.step = step
        self.reason = reason
        self.device = device
        self.netns = netns
        where = f" on {device}" if device else ""
        ns = f" in netns {netns}" if netns else ""
        super().__init__(f"host network, {step}{where}{ns}: {reason}")


class CommandFailed(BrowserVMError):
    """A program browservm runs could not start or exited with a non-zero status.

    `detail` is the end of what it printed; `log` the file holding all of it, when there is one.
    """

    def __init__(self, command: str, reason: str, *, returncode: int | None = None,
                 log: str | None = None, detail: str = "") -> None:
        self.command = command
        self.reason = reason
        self.returncode = returncode
        self.log = log
        self.detail = detail
        where = f" (full log: {log})" if log else ""
        tail = f"\n{detail}" if detail else ""
        super().__init__(f"{command}: {reason}{where}{tail}")


class KernelError(BrowserVMError):
    pass


class KernelImageError(KernelError):
    """`path` is not a kernel browservm can read: empty, truncated, not a kernel, undecodable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"kernel {path}: {reason}")


class KernelBuildError(KernelError):
    def __init__(self, step: str, reason: str, *, log: str | None = None) -> None:
        self.step = step
        self.reason = reason
        self.log = log
        where = f" (full log: {log})" if log else ""
        super().__init__(f"kernel build, {step}: {reason}{where}")


class KernelConfigDropped(KernelBuildError):
    """`make olddefconfig` did not keep what the fragment asked for, usually a missing dependency.

    `options` holds one "CONFIG_X: wanted y, got n" line per option.
    """

    def __init__(self, options: list[str], config: str) -> None:
        self.options = options
        self.config = config
        super().__init__(
            "check-config",
            f"{len(options)} fragment option(s) did not survive olddefconfig (a dependency is missing "
            f"from the fragment): {'; '.join(options)}. The resulting config is {config}",
        )


class ImageBuildError(BrowserVMError):
    """A step of `image build` (or of a VM's disk) failed: carries `step`, `reason`, `log`."""

    def __init__(self, step: str, reason: str, *, log: str | None = None) -> None:
        self.step = step
        self.reason = reason
        self.log = log
        where = f" (full log: {log})" if log else ""
        super().__init__(f"image build, {step}: {reason}{where}")


class ProbeFailed(BrowserVMError):
    """One hop on the way to a VM's desktop did not answer as it should: carries `hop`, `reason`, and
    a `hint` where the evidence supports one beyond the hop's own."""

    def __init__(self, hop: str, reason: str, hint: str | None = None) -> None:
        self.hop = hop
        self.reason = reason
        self.hint = hint  # what to do, when the evidence says more than the hop's own hint
        super().__init__(f"{hop}: {reason}")


class VmmError(BrowserVMError):
    """The VMM of a VM could not be started, stopped or found: carries `vm_id`, `step`, `reason`."""

    def __init__(self, vm_id: str, step: str, reason: str) -> None:
        self.vm_id = vm_id
        self.step = step
        self.reason = reason
        super().__init__(f"VM {vm_id}, VMM {step}: {reason}")


class LimitExceeded(BrowserVMError):
    """A request would go over a configured limit: carries `limit`, `value`, `reason`."""

    def __init__(self, limit: str, value: int, reason: str) -> None:
        self.limit = limit
        self.value = value
        self.reason = reason
        super().__init__(f"refused: {reason}; {limit} is {value}")


class ProfileInUse(BrowserVMError):
    """The user's persistent browser profile is with another live VM: one at a time (409)."""

    def __init__(self, tenant: str, user: str, vm_id: str | None = None) -> None:
        self.tenant = tenant
        self.user = user
        self.vm_id = vm_id
        whose = f"user {user[:64]!r}" + (f" of tenant {tenant[:64]!r}" if tenant else "")
        held = f"VM {vm_id}" if vm_id else "another live VM"
        super().__init__(f"the persistent browser profile of {whose} is in use by {held}: one VM at a time "
                         "(end that VM first; its profile is saved as it ends)")


class ProfileNotFound(BrowserVMError):
    def __init__(self, tenant: str, user: str) -> None:
        self.tenant = tenant
        self.user = user
        whose = f"user {user[:64]!r}" + (f" of tenant {tenant[:64]!r}" if tenant else "")
        super().__init__(f"no browser profile kept for {whose}")


class StateConflict(StateError):
    """A VM's record is no longer what this writer read: someone else changed or removed it first.

    Every write of a record is a compare-and-set, so two requests racing on one VM never both win.
    """

    def __init__(self, vm_id: str, writing: str, found: str | None) -> None:
        self.vm_id = vm_id
        self.writing = writing
        self.found = found
        now = "it is gone" if found is None else f"it is {found} now"
        super().__init__(f"VM {vm_id}", f"changed by someone else before it could be written as {writing}: {now}")


class AlreadyServed(StateError):
    """Another controller process serves this state directory."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.pid = pid
        who = f"process {pid}" if pid else "another process"
        super().__init__(path, f"already served by {who}; stop it first or use another --state-dir")


class CleanupFailed(BrowserVMError):
    """Some of a VM's resources could not be released; the record keeps them counted until they are."""

    def __init__(self, vm_id: str, errors: list[str]) -> None:
        self.vm_id = vm_id
        self.errors = errors
        super().__init__(f"VM {vm_id}: cleanup failed: {'; '.join(errors)}")


class OperationFailed(BrowserVMError):
    """An OS call failed while a command ran (disk full, permission denied, a missing file)."""

    def __init__(self, operation: str, error: OSError) -> None:
        self.operation = operation
        self.reason = error.strerror or str(error)
        self.path = str(error.filename) if error.filename is not None else None
        where = f": {self.path}" if self.path else ""
        super().__init__(f"{operation}: {self.reason}{where}")


class VmNotFound(BrowserVMError):
    """No VM with this id (never was, or deleted)."""

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(f"no VM {vm_id}")


class WrongState(BrowserVMError):
    """The VM is not in a state that allows this: carries `vm_id`, `state`, `reason`."""

    def __init__(self, vm_id: str, state: str, reason: str) -> None:
        self.vm_id = vm_id
        self.state = state
        self.reason = reason
        super().__init__(f"VM {vm_id} is {state}: {reason}")
