"""`kernel build` for real: both variants from Debian's linux-source, then `kernel inspect` on them.

The first run on a machine builds for about 5 minutes (2 cores), the second
variant relinks in seconds; later runs find both in ~/.cache/browservm/kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from browservm.errors import KernelConfigDropped
from browservm.images.kernel_build import (
    WITH_IP_PNP,
    WITHOUT_IP_PNP,
    BuiltKernel,
    Fragment,
    KernelBuilder,
    KernelCache,
    KernelSource,
    Variant,
    default_cache_dir,
    kernel_key,
)
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_config import KernelConfig
from browservm.images.kernel_image import ELF, read_kernel_image
from browservm.images.kernel_inspect import CONFIG, IGNORES_IP, NOT_BUILT_IN, OPTIONS, inspect_kernel
from browservm.runner import CommandRunner

pytestmark = pytest.mark.kernel

RUNNER = CommandRunner()
VARIANTS = (WITH_IP_PNP, WITHOUT_IP_PNP)


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_inspect_reads_our_kernels_config_back(built: dict[str, BuiltKernel], variant: str) -> None:
    kernel = built[variant]
    config = KernelConfig.parse(kernel.config.read_text())
    report = inspect_kernel(read_kernel_image(kernel.vmlinux, PayloadDecompressor(RUNNER)))
    assert (report.format, report.release, report.config_source) == (ELF, kernel.release, CONFIG)
    assert {a.name: a.value for a in report.options} == {spec.name: config.value(spec.name) for spec in OPTIONS}
    assert report.ready and report.virtio_built_in and not report.needs_initramfs
    if variant == WITH_IP_PNP.name:
        assert report.verdict.endswith("it applies ip= itself (CONFIG_IP_PNP=y)")
    else:
        assert report.verdict.endswith(IGNORES_IP)


@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_evidence_alone_gives_the_same_answers_on_our_kernels(built: dict[str, BuiltKernel], variant: str) -> None:
    """Our kernels carry their config, so they check the evidence markers inspect uses on kernels that do not."""
    config = KernelConfig.parse(built[variant].config.read_text())
    image = read_kernel_image(built[variant].vmlinux, PayloadDecompressor(RUNNER))
    specs = {spec.name: spec for spec in OPTIONS}
    for answer in inspect_kernel(image, use_embedded_config=False).options:
        truth = config.value(answer.name)
        expected = truth if truth == "y" or not specs[answer.name].tristate else NOT_BUILT_IN
        assert answer.value == expected, (answer, truth)


def test_the_variants_differ_in_ip_pnp_alone(built: dict[str, BuiltKernel]) -> None:
    with_pnp, without = (KernelConfig.parse(built[v.name].config.read_text()) for v in VARIANTS)
    names = set(with_pnp.options) | set(without.options)
    assert {n for n in names if with_pnp.value(n) != without.value(n)} == {"CONFIG_IP_PNP"}
    assert built[WITH_IP_PNP.name].vmlinux != built[WITHOUT_IP_PNP.name].vmlinux


@pytest.mark.parametrize("flags", [[], ["--without-ip-pnp"]])
def test_a_second_build_returns_the_cached_kernel_at_once(built: dict[str, BuiltKernel], flags: list[str]) -> None:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "browservm", "kernel", "build", "--json", *flags],
                          capture_output=True, text=True, check=True)
    elapsed = time.monotonic() - started
    printed = json.loads(done.stdout)
    variant = WITHOUT_IP_PNP.name if flags else WITH_IP_PNP.name
    assert printed["cached"] is True and printed["vmlinux"] == str(built[variant].vmlinux)
    assert done.stderr == ""  # no build stages: nothing was built
    assert elapsed < 10, f"a cached build took {elapsed:.1f} s"


def test_an_option_olddefconfig_drops_fails_the_build_naming_it(builder: KernelBuilder,
                                                                 built: dict[str, BuiltKernel]) -> None:
    # IP_PNP_DHCP depends on IP_PNP, which this variant turns off: olddefconfig drops it without a word.
    broken = Variant("test-dropped", "# CONFIG_IP_PNP is not set\nCONFIG_IP_PNP_DHCP=y\n")
    with pytest.raises(KernelConfigDropped) as caught:
        builder.build(broken)
    assert caught.value.options == ["CONFIG_IP_PNP_DHCP: wanted y, got n"]
    assert caught.value.step == "check-config"
    assert "CONFIG_IP_PNP_DHCP: wanted y, got n" in str(caught.value)
    source = KernelSource.installed(RUNNER)
    cache = KernelCache(default_cache_dir())
    assert cache.lookup(cache.kernel_dir(source, broken, kernel_key(source, Fragment.packaged(), broken))) is None
