"""The guest kernel command line, and the kernel's `ip=` grammar.

The grammar is the kernel's own (net/ipv4/ipconfig.c, documented in
Documentation/admin-guide/nfs/nfsroot.rst):

    ip=<client>:<server>:<gw>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>:<ntp0>
    ip=off|none|on|any|dhcp|bootp|rarp|both

Empty fields mean "not given". The host writes `ip=` with `format_ip_config`;
the guest's network configurator reads it back with `parse_ip_config`, from
this very file, so the two can never disagree. That is why this module uses
only the standard library and `browservm.errors`.

Where the kernel is lenient we are strict, so a mistake is caught on the host
instead of being silently ignored in the guest: unknown words, more than ten
fields, a non-contiguous netmask or a gateway outside the client's subnet are
errors that name the field.
"""

from __future__ import annotations

import enum
import string
from dataclasses import dataclass, fields
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, IPv4Network

from browservm.guest.errors import InvalidInput

FIELD_NAMES = (
    "client", "server", "gateway", "netmask", "hostname",
    "device", "autoconf", "dns0", "dns1", "ntp0",
)
_ADDRESS_FIELDS = ("client", "server", "gateway", "netmask", "dns0", "dns1", "ntp0")
_UNSET = (IPv4Address(0), IPv4Address(0xFFFFFFFF))  # the kernel's ANY and NONE: "not given"
_HOSTNAME_CHARS = set(string.ascii_letters + string.digits + "-.")
MAX_HOSTNAME = 64  # the kernel's __NEW_UTS_LEN
MAX_IFNAME = 15  # IFNAMSIZ minus the trailing NUL
MAX_CMDLINE = 2048  # x86 COMMAND_LINE_SIZE, NUL included


class Autoconf(enum.Enum):
    OFF = "off"
    ON = "on"
    DHCP = "dhcp"
    BOOTP = "bootp"
    RARP = "rarp"
    BOTH = "both"


_AUTOCONF_WORDS = {
    "off": Autoconf.OFF, "none": Autoconf.OFF,
    "on": Autoconf.ON, "any": Autoconf.ON,
    "dhcp": Autoconf.DHCP, "bootp": Autoconf.BOOTP,
    "rarp": Autoconf.RARP, "both": Autoconf.BOTH,
}


class BootArgsError(InvalidInput):
    """A kernel command line value that the guest kernel would misread."""


@dataclass(frozen=True)
class IpConfig:
    """One `ip=` argument; `None` is an empty field."""

    client: IPv4Address | None = None
    server: IPv4Address | None = None
    gateway: IPv4Address | None = None
    netmask: IPv4Address | None = None
    hostname: str | None = None
    device: str | None = None
    autoconf: Autoconf | None = None
    dns0: IPv4Address | None = None
    dns1: IPv4Address | None = None
    ntp0: IPv4Address | None = None

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def static(cls, address: IPv4Interface, gateway: IPv4Address | None, *,
               device: str = "eth0", hostname: str | None = None,
               dns: tuple[IPv4Address, ...] = ()) -> IpConfig:
        """A static configuration with autoconfiguration off, as browservm writes it."""
        if len(dns) > 2:
            raise BootArgsError("dns", dns, "the kernel takes at most two name servers")
        return cls(
            client=address.ip, gateway=gateway, netmask=address.netmask,
            hostname=hostname, device=device, autoconf=Autoconf.OFF,
            dns0=dns[0] if dns else None, dns1=dns[1] if len(dns) > 1 else None,
        )

    @property
    def interface(self) -> IPv4Interface | None:
        """Client address with its prefix, when both are given."""
        if self.client is None or self.netmask is None:
            return None
        return IPv4Interface(f"{self.client}/{self.netmask}")

    @property
    def disabled(self) -> bool:
        """True for `ip=off`: no address given and no autoconfiguration wanted."""
        return self.client is None and self.autoconf is Autoconf.OFF

    @property
    def dns(self) -> tuple[IPv4Address, ...]:
        return tuple(a for a in (self.dns0, self.dns1) if a is not None)


def _validate(cfg: IpConfig) -> None:
    for name in _ADDRESS_FIELDS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if not isinstance(value, IPv4Address):
            raise BootArgsError(name, value, "must be an IPv4 address")
        if value in _UNSET:
            raise BootArgsError(
                name, str(value), "the kernel reads this value as 'not given'; leave the field empty")
    if cfg.netmask is not None:
        try:
            IPv4Network(f"0.0.0.0/{cfg.netmask}")
        except ValueError:
            raise BootArgsError("netmask", str(cfg.netmask), "the one-bits are not contiguous") from None
    if cfg.client is not None and (cfg.client.is_multicast or cfg.client.is_loopback):
        raise BootArgsError("client", str(cfg.client), "must be a unicast, non-loopback address")
    if cfg.hostname is not None:
        _validate_hostname(cfg.hostname)
    if cfg.device is not None:
        _validate_device(cfg.device)
    if cfg.autoconf is not None and not isinstance(cfg.autoconf, Autoconf):
        raise BootArgsError("autoconf", cfg.autoconf, "must be an Autoconf value")
    iface = cfg.interface
    if iface is not None and iface.network.prefixlen <= 30 and cfg.client in (
            iface.network.network_address, iface.network.broadcast_address):
        raise BootArgsError("client", str(cfg.client), f"is the network or broadcast address of {iface.network}")
    if iface is not None and cfg.gateway is not None:
        if cfg.gateway not in iface.network:
            raise BootArgsError("gateway", str(cfg.gateway), f"is outside the client's subnet {iface.network}")
        if cfg.gateway == cfg.client:
            raise BootArgsError("gateway", str(cfg.gateway), "is the client's own address")


def _validate_hostname(hostname: str) -> None:
    if not hostname:
        raise BootArgsError("hostname", hostname, "must not be empty; use None to leave it out")
    if len(hostname) > MAX_HOSTNAME:
        raise BootArgsError("hostname", hostname, f"must be at most {MAX_HOSTNAME} characters")
    bad = sorted(set(hostname) - _HOSTNAME_CHARS)
    if bad:
        raise BootArgsError("hostname", hostname,
                            f"may contain only letters, digits, '-' and '.', found {''.join(bad)!r}")
    if any(not label or label[0] == "-" or label[-1] == "-" for label in hostname.split(".")):
        raise BootArgsError("hostname", hostname,
                            "each dot-separated label must be non-empty and not start or end with '-'")


def _validate_device(device: str) -> None:
    if not device:
        raise BootArgsError("device", device, "must not be empty; use None to leave it out")
    if len(device) > MAX_IFNAME:
        raise BootArgsError("device", device, f"must be at most {MAX_IFNAME} characters (IFNAMSIZ)")
    if device in (".", "..") or any(c in "/:" or c.isspace() or not c.isprintable() for c in device):
        raise BootArgsError("device", device, "is not a valid interface name")


def _parse_address(name: str, text: str) -> IPv4Address:
    try:
        return IPv4Address(text)
    except AddressValueError:
        raise BootArgsError(name, text, "is not an IPv4 address in dotted-quad form") from None


def _parse_autoconf(text: str) -> Autoconf:
    try:
        return _AUTOCONF_WORDS[text]
    except KeyError:
        if text.startswith("dhcp,"):
            reason = "DHCP client identifiers are not supported"
        else:
            reason = f"must be one of {', '.join(_AUTOCONF_WORDS)}"
        raise BootArgsError("autoconf", text, reason) from None


def parse_ip_config(value: str) -> IpConfig:
    """Parse the value of an `ip=` argument (the text after `ip=`)."""
    if value == "":
        return IpConfig(autoconf=Autoconf.OFF)  # the kernel disables autoconfiguration
    if ":" not in value and value in _AUTOCONF_WORDS:
        return IpConfig(autoconf=_AUTOCONF_WORDS[value])
    parts = value.split(":")
    if len(parts) > len(FIELD_NAMES):
        raise BootArgsError("ip", value, f"has {len(parts)} fields, the kernel reads at most {len(FIELD_NAMES)}")
    raw = dict(zip(FIELD_NAMES, parts, strict=False))
    given = {name: text for name, text in raw.items() if text != ""}
    kwargs: dict[str, object] = {}
    for name, text in given.items():
        if name in _ADDRESS_FIELDS:
            kwargs[name] = _parse_address(name, text)
        elif name == "autoconf":
            kwargs[name] = _parse_autoconf(text)
        else:
            kwargs[name] = text
    return IpConfig(**kwargs)  # type: ignore[arg-type]


def format_ip_config(cfg: IpConfig) -> str:
    """The value of an `ip=` argument; `parse_ip_config` reads it back unchanged."""
    values = [getattr(cfg, f.name) for f in fields(cfg)]
    texts = ["" if v is None else (v.value if isinstance(v, Autoconf) else str(v)) for v in values]
    if cfg.autoconf is not None and all(t == "" for n, t in zip(FIELD_NAMES, texts, strict=True) if n != "autoconf"):
        return cfg.autoconf.value
    while texts and texts[-1] == "":
        texts.pop()
    # All fields empty still means "autoconfigure", unlike a bare `ip=` which means off.
    return ":".join(texts) if texts else ":"


def ip_config_from_cmdline(cmdline: str) -> IpConfig | None:
    """The `ip=` (or its old alias `nfsaddrs=`) of a command line; the last one wins, as in the kernel."""
    value = None
    for word in cmdline.split():
        key, sep, rest = word.partition("=")
        if sep and key in ("ip", "nfsaddrs"):
            value = rest
    return None if value is None else parse_ip_config(value)


@dataclass(frozen=True)
class BootArgs:
    """What goes on a browservm guest's kernel command line.

    Firecracker drops its default command line once `boot_args` is set, so
    this is the whole line. `console=ttyS0` and no `quiet`: the lines that
    prove whether the kernel applied `ip=` must reach the console log.
    """

    ip: IpConfig | None
    console: str = "ttyS0"
    root: str = "/dev/vda"
    rootfstype: str = "ext4"
    read_only: bool = False
    reboot: str = "k"
    panic: int = 1
    init: str | None = None
    extra: tuple[str, ...] = ()


def build_boot_args(args: BootArgs) -> str:
    words = [
        f"console={args.console}", f"reboot={args.reboot}", f"panic={args.panic}",
        f"root={args.root}", "ro" if args.read_only else "rw", f"rootfstype={args.rootfstype}",
        "net.ifnames=0", "biosdevname=0",
    ]
    if args.init is not None:
        words.append(f"init={args.init}")
    if args.ip is not None:
        words.append(f"ip={format_ip_config(args.ip)}")
    for word in args.extra:
        if not word or any(c.isspace() or not c.isprintable() for c in word):
            raise BootArgsError("extra", word, "each extra argument must be one printable word")
        if word == "quiet":
            raise BootArgsError("extra", word, "would hide the console lines that show whether ip= was applied")
        if word.partition("=")[0] in ("ip", "nfsaddrs"):
            raise BootArgsError("extra", word, "set the address through BootArgs.ip, not as an extra word")
        words.append(word)
    for word in words:
        if any(c.isspace() for c in word):
            raise BootArgsError(word.partition("=")[0], word, "must not contain whitespace")
    line = " ".join(words)
    if len(line) >= MAX_CMDLINE:
        raise BootArgsError("boot_args", line[:60] + "...", f"is {len(line)} bytes, the kernel keeps {MAX_CMDLINE - 1}")
    return line
