"""browservm-net: the guest's early-boot network configurator.

The incident this product exists to end: a guest kernel built without
CONFIG_IP_PNP ignores `ip=`, the VM boots, every service starts, and nobody
can reach it. So the guest does not depend on that one kernel option: before
the network target, this program reads `ip=` from /proc/cmdline with the very
module the host wrote it with (browservm.guest.bootargs), configures the device if
the kernel has not, and prints one marker line on the console saying what it
found and did:

    browservm-net: status=ok device=eth0 address=192.168.100.3/24 gateway=192.168.100.1 by=kernel
    browservm-net: status=ok device=eth0 address=192.168.100.3/24 gateway=192.168.100.1 by=configurator
    browservm-net: status=failed device=eth0 address=... reason='device eth0 did not appear within 10 s'

`browservm.net=off` on the command line turns it off (to reproduce the
incident in tests). Stdlib-only plus iproute2's `ip` in the image.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Any, Protocol

from browservm.guest.bootargs import BootArgsError, IpConfig, ip_config_from_cmdline
from browservm.guest.markers import format_marker

DISABLE_WORD = "browservm.net=off"
_RTMGRP_LINK = 0x1
_IP_TIMEOUT_S = 10


class NetError(Exception):
    """A step of the configuration failed; the message goes into the marker."""


@dataclass(frozen=True)
class Outcome:
    status: str  # ok, failed, skipped, disabled
    device: str | None = None
    address: IPv4Interface | None = None
    gateway: IPv4Address | None = None
    by: str | None = None  # kernel or configurator
    reason: str | None = None

    def marker(self) -> str:
        return format_marker("net", status=self.status, device=self.device, address=self.address,
                             gateway=self.gateway, by=self.by, reason=self.reason)


class NetOps(Protocol):
    def devices(self) -> list[str]: ...
    def wait_for_device(self, name: str, timeout: float) -> bool: ...
    def state(self, name: str) -> tuple[bool, list[IPv4Interface]]: ...
    def default_gateway(self) -> IPv4Address | None: ...
    def set_up(self, name: str) -> None: ...
    def add_address(self, name: str, address: IPv4Interface) -> None: ...
    def set_default_route(self, gateway: IPv4Address, name: str) -> None: ...
    def set_hostname(self, hostname: str) -> None: ...
    def write_resolv_conf(self, servers: Sequence[IPv4Address]) -> None: ...


class IpCommand:
    """NetOps through iproute2's `ip -j` and the kernel's files."""

    def __init__(self, resolv_conf: Path = Path("/etc/resolv.conf"),
                 sys_class_net: Path = Path("/sys/class/net")) -> None:
        self._resolv_conf = resolv_conf
        self._sys_class_net = sys_class_net

    def _ip(self, *args: str) -> Any:
        try:
            done = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=_IP_TIMEOUT_S,
                                  check=False)
        except FileNotFoundError:
            raise NetError("iproute2's ip is not installed in the image") from None
        except subprocess.TimeoutExpired:
            raise NetError(f"ip {' '.join(args)} did not finish within {_IP_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise NetError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
        return json.loads(done.stdout) if done.stdout.strip() else []

    def devices(self) -> list[str]:
        return sorted(p.name for p in self._sys_class_net.iterdir() if p.name != "lo")

    def wait_for_device(self, name: str, timeout: float) -> bool:
        """Wait until the device exists, woken by the kernel's link notifications."""
        deadline = time.monotonic() + timeout
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as events:
            events.bind((0, _RTMGRP_LINK))  # subscribe first, then look: no notification can slip between
            while not (self._sys_class_net / name).exists():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                readable, _, _ = select.select([events], [], [], remaining)
                if readable:
                    events.recv(65536)
        return True

    def state(self, name: str) -> tuple[bool, list[IPv4Interface]]:
        entries = self._ip("-4", "addr", "show", "dev", name)
        if not entries:
            return False, []
        entry = entries[0]
        addresses = [IPv4Interface(f"{a['local']}/{a['prefixlen']}") for a in entry.get("addr_info", [])]
        return "UP" in entry.get("flags", []), addresses

    def default_gateway(self) -> IPv4Address | None:
        for route in self._ip("-4", "route", "show", "default"):
            if "gateway" in route:
                return IPv4Address(route["gateway"])
        return None

    def set_up(self, name: str) -> None:
        self._ip("link", "set", "dev", name, "up")

    def add_address(self, name: str, address: IPv4Interface) -> None:
        self._ip("addr", "replace", str(address), "dev", name)

    def set_default_route(self, gateway: IPv4Address, name: str) -> None:
        self._ip("route", "replace", "default", "via", str(gateway), "dev", name)

    def set_hostname(self, hostname: str) -> None:
        try:
            socket.sethostname(hostname)
        except OSError as exc:
            raise NetError(f"cannot set hostname {hostname}: {exc.strerror}") from None

    def write_resolv_conf(self, servers: Sequence[IPv4Address]) -> None:
        text = "".join(f"nameserver {server}\n" for server in servers)
        temporary = self._resolv_conf.with_name(self._resolv_conf.name + ".browservm")
        try:
            temporary.write_text(text)
            os.replace(temporary, self._resolv_conf)  # also replaces a dangling symlink
        except OSError as exc:
            raise NetError(f"cannot write {self._resolv_conf}: {exc.strerror}") from None


def _classful(client: IPv4Address) -> IPv4Interface:
    """The kernel's netmask when `ip=` gives none: by address class."""
    first = int(client) >> 24
    prefix = 8 if first < 128 else 16 if first < 192 else 24
    return IPv4Interface(f"{client}/{prefix}")


def configure(cfg: IpConfig | None, ops: NetOps, timeout: float = 10.0) -> Outcome:
    if cfg is None:
        return Outcome("skipped", reason="no ip= argument on the kernel command line")
    if cfg.disabled:
        return Outcome("skipped", reason="ip=off")
    devices = [cfg.device] if cfg.device is not None else ops.devices()
    if len(devices) != 1:
        return Outcome("failed", reason=f"ip= names no device and there are {len(devices)}: {devices}")
    device = devices[0]
    address = None if cfg.client is None else (cfg.interface or _classful(cfg.client))
    result = Outcome("failed", device=device, address=address, gateway=cfg.gateway)
    try:
        if not ops.wait_for_device(device, timeout):
            raise NetError(f"device {device} did not appear within {timeout:g} s")
        if address is None:
            return _with(result, status="ok", **_dynamic(cfg, device, ops))
        return _with(result, status="ok", by=_static(cfg, device, address, ops))
    except NetError as exc:
        return _with(result, reason=str(exc))


def _dynamic(cfg: IpConfig, device: str, ops: NetOps) -> dict[str, Any]:
    """Only the kernel's own autoconfiguration (IP_PNP with DHCP or BOOTP) is recognised."""
    up, addresses = ops.state(device)
    if not (up and addresses):
        wanted = cfg.autoconf.value if cfg.autoconf else "any"
        raise NetError(f"ip= asks for {wanted} autoconfiguration, which the kernel did not do; "
                       "give a static address")
    return {"address": addresses[0], "gateway": ops.default_gateway(), "by": "kernel"}


def _static(cfg: IpConfig, device: str, address: IPv4Interface, ops: NetOps) -> str:
    """Complete whatever the kernel did not do; returns who configured the device."""
    up, addresses = ops.state(device)
    if up and address in addresses and (cfg.gateway is None or ops.default_gateway() == cfg.gateway):
        return "kernel"
    ops.set_up("lo")
    ops.set_up(device)
    if address not in addresses:
        ops.add_address(device, address)
    if cfg.gateway is not None:
        ops.set_default_route(cfg.gateway, device)
    if cfg.hostname is not None:
        ops.set_hostname(cfg.hostname.partition(".")[0])
    if cfg.dns:
        ops.write_resolv_conf(cfg.dns)
    return "configurator"


def _with(outcome: Outcome, **changes: Any) -> Outcome:
    return dataclasses.replace(outcome, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-net", description="Configure the guest network from ip=.")
    parser.add_argument("--cmdline-file", type=Path, default=Path("/proc/cmdline"))
    parser.add_argument("--resolv-conf", type=Path, default=Path("/etc/resolv.conf"))
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the device")
    args = parser.parse_args(argv)

    cmdline = args.cmdline_file.read_text()
    if DISABLE_WORD in cmdline.split():
        outcome = Outcome("disabled", reason=DISABLE_WORD)
    else:
        try:
            cfg = ip_config_from_cmdline(cmdline)
        except BootArgsError as exc:
            outcome = Outcome("failed", reason=f"unreadable ip= argument: {exc}")
        else:
            outcome = configure(cfg, IpCommand(resolv_conf=args.resolv_conf), timeout=args.timeout)
    print(outcome.marker(), flush=True)
    return 1 if outcome.status == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
