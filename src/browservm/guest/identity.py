"""browservm-identity: a VM restored from a snapshot takes its own identity before its link comes up.

Every clone of a snapshot wakes up as the VM the snapshot was taken of: its MAC, address,
hostname, machine-id, random-number state, secrets, and a wall clock as old as the snapshot.
The host restores it with the VM's own config disk in place of the original's and the network
link held down (QMP `set_link`); this daemon sees the new VM id on the config disk and, in order:

    MAC, address and route of eth0   hostname   machine-id   the kernel's RNG (reseeded with the
    host's entropy, credited)   the wall clock (stepped to the host's time written just before
    the restored VM resumed)   the desktop's VNC password

(The OAuth agent takes its new key itself: it checks each request against the disk's key.)

then prints the markers readiness waits for, and the host brings the link up:

    browservm-net: status=ok device=eth0 address=192.168.100.9/24 gateway=192.168.100.1 by=identity
    browservm-ready: service=desktop state=ready services=... restored=yes

The config disk is polled (read past the guest's page cache with O_DIRECT): a disk has no event
for "the host changed me", and a 4 KiB read four times a second costs nothing. Runs as root.
Stdlib-only plus iproute2's `ip`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any

from browservm.guest import configdisk
from browservm.guest.desktop import password_file_bytes, write_vnc_password
from browservm.guest.markers import format_marker

POLL_S = 0.25
DEVICE = "eth0"
_RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
_RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
_COMMAND_TIMEOUT_S = 10


class IdentityError(Exception):
    """A step failed; the message goes into the marker."""


@dataclass(frozen=True)
class Identity:
    vm_id: str
    mac: str
    address: IPv4Interface
    gateway: IPv4Address
    entropy: bytes  # from the host's RNG, 64 bytes
    time: float  # the host's wall clock when it let the VM resume

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Identity | None:
        section = document.get("identity")
        if not isinstance(section, dict):
            return None
        try:
            identity = cls(vm_id=str(document["vm_id"]), mac=str(section["mac"]),
                           address=IPv4Interface(section["address"]), gateway=IPv4Address(section["gateway"]),
                           entropy=bytes.fromhex(section["entropy"]), time=float(section["time"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise IdentityError(f"unreadable identity on the config disk: {exc}") from None
        if len(identity.entropy) < 32:
            raise IdentityError("the config disk carries less than 32 bytes of entropy")
        return identity


def _run(*argv: str, stdin: str | None = None) -> None:
    try:
        done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IdentityError(f"{argv[0]}: {exc}") from None
    if done.returncode != 0:
        raise IdentityError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit status {done.returncode}'}")


def reseed(entropy: bytes, urandom: Path = Path("/dev/urandom")) -> None:
    """Mix `entropy` into the kernel's pool, credit it, and reseed the CRNG from the pool now: without
    the last step every clone's getrandom() would go on giving the same bytes until the kernel's own
    next reseed (up to a minute later)."""
    request = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
    with urandom.open("wb") as stream:
        fcntl.ioctl(stream.fileno(), _RNDADDENTROPY, request)
        fcntl.ioctl(stream.fileno(), _RNDRESEEDCRNG)


@dataclass
class Applier:
    """The steps, with the guest's paths (tests point them elsewhere)."""

    machine_id: Path = Path("/etc/machine-id")
    etc_hostname: Path = Path("/etc/hostname")
    vnc_password_file: Path | None = None
    vnc_owner: str = "browser"
    services: Sequence[str] = ()  # the desktop's parts: which VNC server's password file to write

    def apply(self, identity: Identity, document: dict[str, Any], read_at: float) -> None:
        # One `ip` process for all of it: under emulation each process costs a few hundred milliseconds,
        # and this is on the path of every restored VM. It stops at the first command that fails.
        # IPv4 (-4) for every command, flushes too: the host drops whatever else a VM sends.
        _run("ip", "-4", "-batch", "-", stdin="\n".join((
            f"link set dev {DEVICE} down",
            f"link set dev {DEVICE} address {identity.mac}",
            f"addr flush dev {DEVICE}",
            f"addr replace {identity.address} dev {DEVICE}",
            f"neigh flush dev {DEVICE}",
            f"link set dev {DEVICE} up",
            f"route replace default via {identity.gateway} dev {DEVICE}",
        )) + "\n")
        socket.sethostname(identity.vm_id)
        self.etc_hostname.write_text(identity.vm_id + "\n")
        reseed(identity.entropy)
        self.machine_id.write_text(os.urandom(16).hex() + "\n")  # after the reseed: its own
        # The host wrote its clock just before the VM resumed; add what passed here since the read.
        time.clock_settime(time.CLOCK_REALTIME, identity.time + (time.monotonic() - read_at))
        if self.vnc_password_file is not None:
            # The VNC server rereads its password file for each new client (guest/desktop.py).
            content = password_file_bytes(document.get("secrets", {}), self.services)
            write_vnc_password(self.vnc_password_file, content, self.vnc_owner)


def watch(disk: Path, applier: Applier, services: Sequence[str], poll: float = POLL_S,
          done: Callable[[], bool] = lambda: False) -> None:
    """Apply every new identity the config disk carries, for as long as the VM runs (or until `done`)."""
    current = configdisk.read_uncached(disk).get("vm_id")
    while not done():
        time.sleep(poll)
        try:
            document = configdisk.read_uncached(disk)
        except (OSError, configdisk.ConfigDiskError):
            continue  # the host is rewriting it: the next read sees it whole
        read_at = time.monotonic()
        if document.get("vm_id") == current:
            continue
        current = document.get("vm_id")
        try:
            identity = Identity.from_document(document)
            if identity is None:
                continue
            applier.apply(identity, document, read_at)
        except (IdentityError, OSError, configdisk.ConfigDiskError) as exc:
            print(format_marker("net", status="failed", device=DEVICE, by="identity", reason=str(exc)), flush=True)
            continue
        print(format_marker("net", status="ok", device=DEVICE, address=identity.address, gateway=identity.gateway,
                            by="identity"), flush=True)
        # What the guest now is, in its own words: operators (and tests) compare clones with it. Random
        # bytes from a reseeded CRNG say nothing of its later output.
        print(format_marker("identity", vm_id=identity.vm_id, hostname=socket.gethostname(),
                            machine_id=applier.machine_id.read_text().strip() if applier.machine_id.exists() else "",
                            random=os.urandom(16).hex(), clock=f"{time.time():.3f}"), flush=True)
        # The desktop kept running through the snapshot: say so, as it did at its boot.
        for listener in ("xvnc", "x11vnc", "websockify"):
            if listener in services:
                print(format_marker("ready", service=listener, state="ready", restored="yes"), flush=True)
        print(format_marker("ready", service="desktop", state="ready", services=",".join(services),
                            restored="yes"), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-identity", description=__doc__.splitlines()[0])
    parser.add_argument("--config-disk", type=Path, default=configdisk.GUEST_DEVICE)
    parser.add_argument("--desktop-config", type=Path, default=Path("/etc/browservm/desktop.json"))
    args = parser.parse_args(argv)
    try:
        desktop = json.loads(args.desktop_config.read_text())
    except (OSError, ValueError):
        desktop = {}
    password_file = desktop.get("vnc_password_file")
    services = desktop.get("services", [])
    applier = Applier(vnc_password_file=Path(password_file) if password_file else None, services=services)
    try:
        watch(args.config_disk, applier, services)
    except (OSError, configdisk.ConfigDiskError) as exc:
        print(format_marker("net", status="failed", device=DEVICE, by="identity", reason=str(exc)), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
