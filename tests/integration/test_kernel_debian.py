"""`kernel inspect` on Debian's cloud kernel, checked against the config file Debian ships beside it.

That kernel reproduces the incident as it is: no CONFIG_IP_PNP, virtio as modules,
a bzImage. The package is fetched with `apt-get download` (never installed) and
unpacked with `dpkg-deb -x` into ~/.cache/browservm/test-data, once.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from browservm.cli import main
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_config import KernelConfig
from browservm.images.kernel_image import BZIMAGE, ELF, read_kernel_image
from browservm.images.kernel_inspect import EVIDENCE, IGNORES_IP, NOT_BUILT_IN, UNKNOWN, OptionAnswer, inspect_kernel
from browservm.progress import cache_dir
from browservm.runner import CommandRunner

pytestmark = pytest.mark.kernel

METAPACKAGE = "linux-image-cloud-amd64"
RUNNER = CommandRunner()


@dataclass(frozen=True)
class DebianKernel:
    package: str
    vmlinuz: Path
    config: KernelConfig

    @property
    def release(self) -> str:
        return self.vmlinuz.name.removeprefix("vmlinuz-")


def _image_package() -> str:
    """The versioned package the metapackage points at today, e.g. linux-image-6.1.0-56-cloud-amd64."""
    depends = RUNNER.output(["apt-cache", "depends", "--no-recommends", "--no-suggests", METAPACKAGE]).decode()
    names = [line.split(":", 1)[1].strip() for line in depends.splitlines()
             if line.strip().startswith("Depends: linux-image-")]
    assert names, f"apt-cache depends {METAPACKAGE} names no linux-image package:\n{depends}"
    return names[0]


@pytest.fixture(scope="session")
def debian_kernel() -> DebianKernel:
    package = _image_package()
    directory = cache_dir("test-data") / "debian" / package
    unpacked = directory / "root"
    if not unpacked.is_dir():
        directory.mkdir(parents=True, exist_ok=True)
        if not list(directory.glob("*.deb")):
            RUNNER.output(["apt-get", "download", package], cwd=directory)
        (deb,) = directory.glob("*.deb")
        staging = directory / "unpacking"
        shutil.rmtree(staging, ignore_errors=True)
        RUNNER.output(["dpkg-deb", "-x", str(deb), str(staging)])
        staging.rename(unpacked)  # only a complete unpack counts as cached
    (vmlinuz,) = (unpacked / "boot").glob("vmlinuz-*")
    (config,) = (unpacked / "boot").glob("config-*")
    return DebianKernel(package, vmlinuz, KernelConfig.parse(config.read_text()))


def _agrees(answer: OptionAnswer, config: KernelConfig) -> bool:
    """Evidence only sees what is built in: "not built in" is right for a module and for an absent option."""
    truth = config.value(answer.name)
    if answer.value == NOT_BUILT_IN:
        return truth in ("m", "n")
    if answer.value == UNKNOWN:  # only for an option that would live inside a module
        return answer.name == "VIRTIO_MMIO_CMDLINE_DEVICES" and config.value("VIRTIO_MMIO") != "y"
    return answer.value == truth


def test_inspect_answers_agree_with_debians_own_config(debian_kernel: DebianKernel) -> None:
    image = read_kernel_image(debian_kernel.vmlinuz, PayloadDecompressor(RUNNER))
    report = inspect_kernel(image)
    assert (report.format, report.release, report.config_source) == (BZIMAGE, debian_kernel.release, EVIDENCE)
    disagreements = [(a.name, a.value, debian_kernel.config.value(a.name)) for a in report.options
                     if not _agrees(a, debian_kernel.config)]
    assert disagreements == []
    # The incident, as Debian ships it:
    assert (report.value("IP_PNP"), debian_kernel.config.value("IP_PNP")) == ("n", "n")
    for driver in ("VIRTIO_MMIO", "VIRTIO_NET", "VIRTIO_BLK"):
        assert (report.value(driver), debian_kernel.config.value(driver)) == (NOT_BUILT_IN, "m")
    assert (report.value("PVH"), report.value("ACPI")) == ("y", "y")
    assert report.needs_initramfs and not report.ready
    assert report.verdict.endswith(IGNORES_IP)


def test_the_text_report_ends_with_the_ip_verdict(debian_kernel: DebianKernel,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["kernel", "inspect", str(debian_kernel.vmlinuz)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("format   bzImage (boot protocol 2.")
    assert lines[2].startswith(f"version  {debian_kernel.release} (")
    assert lines[-1].startswith("verdict: NOT fit to boot") and lines[-1].endswith(IGNORES_IP)


def test_the_extracted_vmlinux_is_an_elf_of_the_same_version(debian_kernel: DebianKernel, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "vmlinux"
    assert main(["kernel", "inspect", str(debian_kernel.vmlinuz), "--extract-vmlinux", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["extracted_vmlinux"]["release"] == debian_kernel.release
    bzimage = read_kernel_image(debian_kernel.vmlinuz, PayloadDecompressor(RUNNER))
    assert bzimage.setup is not None and bzimage.setup.kernel_version.split(" ")[0] == debian_kernel.release
    extracted = read_kernel_image(out, PayloadDecompressor(RUNNER))
    assert (extracted.format, extracted.release, extracted.banner) == (ELF, debian_kernel.release, bzimage.banner)
    assert extracted.vmlinux.has_pvh_entry
    # binutils, which knows nothing of our parser, agrees that it is an x86_64 executable with the PVH note.
    header = RUNNER.output(["readelf", "--file-header", "--notes", str(out)]).decode()
    assert "EXEC (Executable file)" in header and "X86-64" in header
    assert "Unknown note type: (0x00000012)" in header  # type 18, XEN_ELFNOTE_PHYS32_ENTRY
