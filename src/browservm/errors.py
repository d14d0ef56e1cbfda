"""Every error browservm raises on purpose, in one tree.

    BrowserVMError                      base; `str()` is a sentence a person can act on
    ├── InvalidInput (ValueError)       bad input: carries `field`, `value`, `reason`
    │   └── InvalidVmId                 a VM id that may not reach a file or interface name
    ├── StateError                      the state directory cannot be used (which file, why)
    ├── IpamError
    │   ├── PoolExhausted               every address of the subnet is leased
    │   └── NameCollision               two VM ids derive the same TAP name or MAC
    └── HostNetworkError                a kernel object could not be made or checked:
                                        carries `netns`, `device`, `step`

This module is stdlib-only and imports nothing from browservm: the guest image
carries it next to `bootargs.py`.
"""

from __future__ import annotations


class BrowserVMError(Exception):
    """Base of every error browservm raises on purpose."""


class InvalidInput(BrowserVMError, ValueError):
    """A value given by a person or a program is not acceptable."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {value!r})")


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
