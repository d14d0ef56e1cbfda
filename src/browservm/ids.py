"""Every name derived from a VM id, in one place: TAP device, MAC, hostname.

A VM id is a DNS label (lowercase letters, digits, inner hyphens, 1-63
characters). That one rule keeps it safe as a file name, a hostname and a
command-line word: no separators, no dots, no control characters.

The TAP name is `fc-` plus 12 base32 characters of a SHA-256 of the id (60
bits), so it fits IFNAMSIZ (15 visible characters) for every id and two ids
never share a name by truncation. Hash collisions are astronomically unlikely
but not impossible, so they are *detected*: the IPAM store holds TAP names and
MACs under UNIQUE constraints and refuses a second VM with the same one
(`NameCollision`), and TAP creation refuses a device another VM owns.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import string
from dataclasses import dataclass

from browservm.errors import InvalidVmId

IFNAMSIZ = 16  # includes the trailing NUL: 15 visible characters
TAP_PREFIX = "fc-"
_ALLOWED = set(string.ascii_lowercase + string.digits + "-")
VM_ID_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"  # for OpenAPI documents; _VM_ID is the same
_VM_ID = re.compile(VM_ID_PATTERN[1:-1])


def validate_vm_id(value: str) -> str:
    """Return `value` if it is a well-formed VM id, else raise InvalidVmId."""
    if not isinstance(value, str):
        raise InvalidVmId(value, "must be a string")
    if not value:
        raise InvalidVmId(value, "must not be empty")
    if len(value) > 63:
        raise InvalidVmId(value, f"must be at most 63 characters, has {len(value)}")
    if _VM_ID.fullmatch(value) is None:
        bad = sorted(set(value) - _ALLOWED)
        if bad:
            reason = f"may contain only a-z, 0-9 and '-', found {''.join(bad)!r}"
        else:
            reason = "must start and end with a letter or digit"
        raise InvalidVmId(value, reason)
    return value


def new_vm_id() -> str:
    return "vm-" + secrets.token_hex(6)


def _digest(domain: bytes, vm_id: str) -> bytes:
    return hashlib.sha256(domain + b"\0" + vm_id.encode("ascii")).digest()


@dataclass(frozen=True)
class VmNames:
    vm_id: str
    tap: str
    mac: str
    hostname: str


def names_for(vm_id: str) -> VmNames:
    validate_vm_id(vm_id)
    tap_hash = base64.b32encode(_digest(b"tap", vm_id)).decode("ascii").lower()
    tap = TAP_PREFIX + tap_hash[:12]
    # 02 = locally administered, unicast; fc marks browservm's range.
    mac_tail = _digest(b"mac", vm_id)[:4]
    mac = "02:fc:" + ":".join(f"{b:02x}" for b in mac_tail)
    return VmNames(vm_id=vm_id, tap=tap, mac=mac, hostname=vm_id)
