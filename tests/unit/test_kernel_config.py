import gzip

import pytest

from browservm.errors import KernelImageError
from browservm.images.kernel_config import KernelConfig, Mismatch, embedded_config, mismatches
from tests.unit.kernel_samples import ikconfig

DOT_CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_IP_PNP=y
# CONFIG_IP_PNP_DHCP is not set
CONFIG_VIRTIO_NET=m
CONFIG_NR_CPUS=64
CONFIG_DEFAULT_HOSTNAME="(none)"
CONFIG_SOMETHING_ELSE is not how options look
"""


def test_every_form_of_option_line_is_read_and_missing_options_are_off() -> None:
    config = KernelConfig.parse(DOT_CONFIG)
    assert config.options == {"CONFIG_IP_PNP": "y", "CONFIG_IP_PNP_DHCP": "n", "CONFIG_VIRTIO_NET": "m",
                              "CONFIG_NR_CPUS": "64", "CONFIG_DEFAULT_HOSTNAME": '"(none)"'}
    assert config.value("IP_PNP") == config.value("CONFIG_IP_PNP") == "y"
    assert config.value("IP_PNP_DHCP") == config.value("PVH") == "n"


def test_later_fragments_override_earlier_ones() -> None:
    base = KernelConfig.parse("CONFIG_IP_PNP=y\nCONFIG_NET=y\n")
    merged = base.merged(KernelConfig.parse("# CONFIG_IP_PNP is not set\n"))
    assert merged.options == {"CONFIG_IP_PNP": "n", "CONFIG_NET": "y"}


def test_mismatches_name_each_option_that_did_not_survive() -> None:
    wanted = KernelConfig.parse("CONFIG_IP_PNP=y\nCONFIG_PVH=y\n# CONFIG_PCI is not set\nCONFIG_NR_CPUS=8\n")
    actual = KernelConfig.parse("CONFIG_IP_PNP=y\n# CONFIG_PVH is not set\nCONFIG_NR_CPUS=64\n")
    assert mismatches(wanted, actual) == [Mismatch("CONFIG_PVH", "y", "n"), Mismatch("CONFIG_NR_CPUS", "8", "64")]
    assert str(Mismatch("CONFIG_PVH", "y", "n")) == "CONFIG_PVH: wanted y, got n"
    assert mismatches(wanted, wanted) == []


def test_the_embedded_config_is_read_from_between_its_markers() -> None:
    image = b"\x00" * 100 + ikconfig(DOT_CONFIG) + b"\x00" * 100
    assert embedded_config(image, "k") == KernelConfig.parse(DOT_CONFIG)
    assert embedded_config(b"no config in here", "k") is None


@pytest.mark.parametrize(("image", "reason"), [
    (b"IKCFG_ST" + gzip.compress(b"CONFIG_X=y\n"), "has no 'IKCFG_ED' after it"),
    (b"IKCFG_ST" + b"not gzip at all" + b"IKCFG_ED", "is unreadable"),
    (b"IKCFG_ST" + gzip.compress(b"CONFIG_X=y\n")[:-9] + b"IKCFG_ED", "is unreadable"),
])
def test_a_damaged_embedded_config_is_an_error_naming_the_file(image: bytes, reason: str) -> None:
    with pytest.raises(KernelImageError, match=reason) as caught:
        embedded_config(image, "/boot/vmlinux")
    assert caught.value.path == "/boot/vmlinux"
