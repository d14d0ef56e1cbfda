from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from browservm.guest.bootargs import (
    Autoconf,
    BootArgs,
    BootArgsError,
    IpConfig,
    build_boot_args,
    format_ip_config,
    ip_config_from_cmdline,
    parse_ip_config,
)

A = IPv4Address
SEED_LINE = ("console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4 net.ifnames=0 biosdevname=0 "
             "ip=192.168.100.3::192.168.100.1:255.255.255.0::eth0:off")


@pytest.mark.parametrize(("text", "expected"), [
    ("192.168.100.3::192.168.100.1:255.255.255.0::eth0:off",
     IpConfig(client=A("192.168.100.3"), gateway=A("192.168.100.1"), netmask=A("255.255.255.0"),
              device="eth0", autoconf=Autoconf.OFF)),
    ("dhcp", IpConfig(autoconf=Autoconf.DHCP)),
    ("::::::dhcp", IpConfig(autoconf=Autoconf.DHCP)),
    ("off", IpConfig(autoconf=Autoconf.OFF)),
    ("none", IpConfig(autoconf=Autoconf.OFF)),
    ("", IpConfig(autoconf=Autoconf.OFF)),  # a bare ip= turns autoconfiguration off in the kernel
    ("on", IpConfig(autoconf=Autoconf.ON)),
    ("any", IpConfig(autoconf=Autoconf.ON)),
    ("bootp", IpConfig(autoconf=Autoconf.BOOTP)),
    ("rarp", IpConfig(autoconf=Autoconf.RARP)),
    ("both", IpConfig(autoconf=Autoconf.BOTH)),
    ("10.0.0.2", IpConfig(client=A("10.0.0.2"))),
    ("10.0.0.2:10.0.0.9:10.0.0.1:255.255.255.0:vm-1.example:eth1:off:1.1.1.1:8.8.8.8:10.0.0.5",
     IpConfig(client=A("10.0.0.2"), server=A("10.0.0.9"), gateway=A("10.0.0.1"), netmask=A("255.255.255.0"),
              hostname="vm-1.example", device="eth1", autoconf=Autoconf.OFF,
              dns0=A("1.1.1.1"), dns1=A("8.8.8.8"), ntp0=A("10.0.0.5"))),
])
def test_parse_follows_the_kernel_grammar(text: str, expected: IpConfig) -> None:
    assert parse_ip_config(text) == expected


@pytest.mark.parametrize(("text", "field", "reason"), [
    ("192.168.100.300::192.168.100.1:255.255.255.0::eth0:off", "client", "not an IPv4 address"),
    ("192.168.100.3::192.168.100.1:255.0.255.0::eth0:off", "netmask", "not contiguous"),
    ("192.168.100.3::192.168.101.1:255.255.255.0::eth0:off", "gateway", "outside the client's subnet"),
    ("192.168.100.3::192.168.100.3:255.255.255.0::eth0:off", "gateway", "client's own address"),
    ("192.168.100.0::192.168.100.1:255.255.255.0::eth0:off", "client", "network or broadcast"),
    ("192.168.100.255::192.168.100.1:255.255.255.0::eth0:off", "client", "network or broadcast"),
    ("192.168.100.3::192.168.100.1:255.255.255.0::averyveryverylongname0:off", "device", "at most 15"),
    ("192.168.100.3::192.168.100.1:255.255.255.0::eth/0:off", "device", "not a valid interface name"),
    ("192.168.100.3::192.168.100.1:255.255.255.0::eth0:static", "autoconf", "must be one of"),
    ("::::::dhcp,1,abc", "autoconf", "client identifiers"),
    ("0.0.0.0::10.0.0.1", "client", "not given"),
    ("10.0.0.2:::::::::::", "ip", "at most 10"),
    ("10.0.0.2::::bad_host", "hostname", "found '_'"),
    ("10.0.0.2::::-bad", "hostname", "not start or end with '-'"),
    ("10.0.0.2::::" + "h" * 65, "hostname", "at most 64"),
    ("10.0.0.2:::255.255.255.255", "netmask", "not given"),
    ("224.0.0.1", "client", "unicast"),
    ("static", "client", "not an IPv4 address"),
])
def test_parse_rejects_what_the_kernel_would_misread(text: str, field: str, reason: str) -> None:
    with pytest.raises(BootArgsError) as excinfo:
        parse_ip_config(text)
    assert excinfo.value.field == field
    assert reason in str(excinfo.value)


def test_the_seed_incidents_argument_round_trips() -> None:
    cfg = IpConfig.static(IPv4Interface("192.168.100.3/24"), A("192.168.100.1"))
    assert format_ip_config(cfg) == "192.168.100.3::192.168.100.1:255.255.255.0::eth0:off"
    assert build_boot_args(BootArgs(ip=cfg)) == SEED_LINE


def test_the_whole_command_line_has_what_a_firecracker_guest_needs() -> None:
    cfg = IpConfig.static(IPv4Interface("10.1.0.7/22"), A("10.1.0.1"), hostname="vm-1", dns=(A("10.1.0.1"),))
    line = build_boot_args(BootArgs(ip=cfg, init="/sbin/init", extra=("random.trust_cpu=on",)))
    words = line.split()
    for word in ("console=ttyS0", "reboot=k", "panic=1", "root=/dev/vda", "rw", "rootfstype=ext4",
                 "net.ifnames=0", "init=/sbin/init", "random.trust_cpu=on"):
        assert word in words
    assert "quiet" not in words
    assert ip_config_from_cmdline(line) == cfg


@pytest.mark.parametrize(("extra", "reason"), [
    (("quiet",), "hide the console lines"),
    (("ip=dhcp",), "through BootArgs.ip"),
    (("two words",), "one printable word"),
    (("",), "one printable word"),
    (("x=" + "a" * 3000,), "the kernel keeps 2047"),
])
def test_build_rejects_extras_that_would_break_the_line(extra: tuple[str, ...], reason: str) -> None:
    with pytest.raises(BootArgsError) as excinfo:
        build_boot_args(BootArgs(ip=None, extra=extra))
    assert reason in str(excinfo.value)


def test_the_last_ip_argument_wins_as_in_the_kernel() -> None:
    assert ip_config_from_cmdline("ip=dhcp console=ttyS0 nfsaddrs=off") == IpConfig(autoconf=Autoconf.OFF)
    assert ip_config_from_cmdline("console=ttyS0 root=/dev/vda") is None


def test_static_rejects_more_than_two_name_servers() -> None:
    with pytest.raises(BootArgsError) as excinfo:
        IpConfig.static(IPv4Interface("10.0.0.2/24"), None, dns=(A("1.1.1.1"), A("1.0.0.1"), A("8.8.8.8")))
    assert excinfo.value.field == "dns"


# --- property: parse(format(x)) == x for every valid configuration --------------------

_address = st.integers(min_value=1, max_value=0xFFFFFFFE).map(IPv4Address)
_label = st.from_regex(r"\A[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?\Z")
_hostname = st.lists(_label, min_size=1, max_size=3).map(".".join).filter(lambda h: len(h) <= 64)
_device = st.from_regex(r"\A[a-z][a-z0-9_.-]{0,14}\Z").filter(lambda d: d not in (".", ".."))


@st.composite
def ip_configs(draw: st.DrawFn) -> IpConfig:
    kwargs: dict[str, object] = {}
    if draw(st.booleans()):
        prefix = draw(st.integers(min_value=8, max_value=30))
        network = IPv4Network((draw(_address), prefix), strict=False)
        assume(network.num_addresses >= 4)
        hosts = int(network.network_address) + 1, int(network.broadcast_address) - 1
        client = IPv4Address(draw(st.integers(*hosts)))
        assume(not client.is_multicast and not client.is_loopback)
        kwargs.update(client=client, netmask=network.netmask)
        if draw(st.booleans()):
            gateway = IPv4Address(draw(st.integers(*hosts)))
            assume(gateway != client)
            kwargs["gateway"] = gateway
    for name in ("server", "dns0", "dns1", "ntp0"):
        if draw(st.booleans()):
            kwargs[name] = draw(_address)
    kwargs["hostname"] = draw(st.none() | _hostname)
    kwargs["device"] = draw(st.none() | _device)
    kwargs["autoconf"] = draw(st.none() | st.sampled_from(Autoconf))
    return IpConfig(**kwargs)  # type: ignore[arg-type]


@given(ip_configs())
def test_parse_of_format_is_identity(cfg: IpConfig) -> None:
    text = format_ip_config(cfg)
    assert parse_ip_config(text) == cfg
    assert ip_config_from_cmdline(build_boot_args(BootArgs(ip=cfg))) == cfg


@given(st.text(alphabet="0123456789.:abdfhnoptx-", max_size=60))
def test_parse_either_accepts_or_names_the_field(text: str) -> None:
    try:
        cfg = parse_ip_config(text)
    except BootArgsError as exc:
        assert exc.field in {"ip", "client", "server", "gateway", "netmask", "hostname", "device",
                             "autoconf", "dns0", "dns1", "ntp0"}
    else:
        assert parse_ip_config(format_ip_config(cfg)) == cfg
