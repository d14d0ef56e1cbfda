import gzip
import json
from pathlib import Path

import pytest

from browservm.cli import main
from browservm.images.kernel_bzimage import PayloadDecompressor
from browservm.images.kernel_image import read_kernel_image
from browservm.images.kernel_inspect import (
    BLOCKER,
    CONFIG,
    EVIDENCE,
    IGNORES_IP,
    NOT_BUILT_IN,
    OPTIONS,
    UNKNOWN,
    WARNING,
    KernelReport,
    inspect_kernel,
    render_text,
)
from browservm.runner import CommandRunner
from tests.unit.kernel_samples import ALL_MARKERS, BANNER, PVH_NOTE, ikconfig, make_bzimage, make_elf

DECOMPRESSOR = PayloadDecompressor(CommandRunner())
# The incident's kind of kernel: boots, but ignores ip= and has its virtio drivers as modules.
INCIDENT_CONFIG = """\
# CONFIG_IP_PNP is not set
CONFIG_VIRTIO_MMIO=m
# CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES is not set
CONFIG_VIRTIO_NET=m
CONFIG_VIRTIO_BLK=m
CONFIG_EXT4_FS=y
CONFIG_SERIAL_8250_CONSOLE=y
CONFIG_ACPI=y
CONFIG_PCI=y
CONFIG_PVH=y
"""


def _report(tmp_path: Path, data: bytes, *, use_embedded_config: bool = True) -> KernelReport:
    path = tmp_path / "kernel"
    path.write_bytes(data)
    return inspect_kernel(read_kernel_image(path, DECOMPRESSOR), use_embedded_config=use_embedded_config)


def _values(report: KernelReport) -> dict[str, str]:
    return {answer.name: answer.value for answer in report.options}


def test_an_embedded_config_answers_every_option(tmp_path: Path) -> None:
    report = _report(tmp_path, make_elf(BANNER + ALL_MARKERS + ikconfig(INCIDENT_CONFIG), (PVH_NOTE,)))
    assert report.config_source == CONFIG
    assert {answer.source for answer in report.options} == {CONFIG}
    assert _values(report) == {"IP_PNP": "n", "VIRTIO_MMIO": "m", "VIRTIO_MMIO_CMDLINE_DEVICES": "n",
                               "VIRTIO_NET": "m", "VIRTIO_BLK": "m", "EXT4_FS": "y", "SERIAL_8250_CONSOLE": "y",
                               "ACPI": "y", "PCI": "y", "PVH": "y"}
    assert (report.virtio_built_in, report.needs_initramfs, report.ready) == (False, True, False)
    blockers = [f.message for f in report.findings if f.severity == BLOCKER]
    assert blockers == [f"CONFIG_{name}=m: {what} is a module, so the guest needs an initramfs that loads it"
                        for name, what in (("VIRTIO_MMIO", "the virtio-mmio transport"),
                                           ("VIRTIO_BLK", "the virtio-blk driver (the root disk)"),
                                           ("VIRTIO_NET", "the virtio-net driver (eth0)"))]
    assert report.verdict.startswith("NOT fit")
    assert report.verdict.endswith(
        "this kernel ignores ip=: CONFIG_IP_PNP is not set — the guest's own network configurator must configure eth0")


def test_without_a_config_every_marker_found_is_evidence_of_a_built_in_option(tmp_path: Path) -> None:
    report = _report(tmp_path, make_elf(BANNER + ALL_MARKERS, (PVH_NOTE,)))
    assert report.config_source == EVIDENCE
    assert {answer.source for answer in report.options} == {EVIDENCE}
    assert set(_values(report).values()) == {"y"}
    assert (report.virtio_built_in, report.needs_initramfs, report.ready) == (True, False, True)
    assert report.findings == ()
    assert report.verdict == ("fit to boot as a Firecracker microVM guest without an initramfs; "
                              "it applies ip= itself (CONFIG_IP_PNP=y)")


def test_without_markers_evidence_says_only_what_an_image_can_show(tmp_path: Path) -> None:
    report = _report(tmp_path, make_elf(BANNER))
    # Tristates could be modules: "not built in"; a bool that would live in a module: "unknown".
    assert _values(report) == {"IP_PNP": "n", "VIRTIO_MMIO": NOT_BUILT_IN, "VIRTIO_MMIO_CMDLINE_DEVICES": UNKNOWN,
                               "VIRTIO_NET": NOT_BUILT_IN, "VIRTIO_BLK": NOT_BUILT_IN, "EXT4_FS": NOT_BUILT_IN,
                               "SERIAL_8250_CONSOLE": "n", "ACPI": "n", "PCI": "n", "PVH": "n"}
    assert report.virtio_built_in is False and report.needs_initramfs
    blockers = [f.message for f in report.findings if f.severity == BLOCKER]
    assert [m.split(" is not built in")[0] for m in blockers] == [
        "the virtio-mmio transport", "the virtio-blk driver (the root disk)", "the virtio-net driver (eth0)",
        "the ext4 filesystem (the root filesystem)"]
    assert any(f.message == IGNORES_IP for f in report.findings if f.severity == WARNING)
    assert any("virtio_mmio.device= arguments are honoured" in f.message for f in report.findings)


def test_cmdline_devices_without_acpi_is_a_blocker_and_with_acpi_a_warning(tmp_path: Path) -> None:
    base = INCIDENT_CONFIG.replace("=m", "=y").replace("# CONFIG_IP_PNP is not set", "CONFIG_IP_PNP=y")
    with_acpi = _report(tmp_path, make_elf(BANNER + ikconfig(base)))
    assert [f.severity for f in with_acpi.findings] == [WARNING]
    assert "found only through ACPI" in with_acpi.findings[0].message
    without_acpi = _report(tmp_path, make_elf(BANNER + ikconfig(base.replace("CONFIG_ACPI=y", ""))))
    assert [f.severity for f in without_acpi.findings] == [BLOCKER]
    assert "cannot find Firecracker's virtio-mmio devices" in without_acpi.findings[0].message


def test_evidence_can_be_asked_for_even_when_a_config_is_embedded(tmp_path: Path) -> None:
    report = _report(tmp_path, make_elf(BANNER + ikconfig(INCIDENT_CONFIG)), use_embedded_config=False)
    assert report.config_source == EVIDENCE
    assert report.options[0].detail == 'no "IP-Config:" in the image'


def test_a_bzimage_is_a_blocker_until_its_vmlinux_is_extracted(tmp_path: Path) -> None:
    report = _report(tmp_path, make_bzimage(gzip.compress(make_elf(BANNER + ALL_MARKERS, (PVH_NOTE,)))))
    assert (report.format, report.compression, report.boot_protocol) == ("bzImage", "gzip", "2.15")
    assert [f.message for f in report.findings] == [
        "Firecracker on x86_64 boots an ELF vmlinux and this is a bzImage: unpack it with --extract-vmlinux"]
    assert not report.ready


def test_the_text_report_lists_every_option_and_ends_with_the_verdict(tmp_path: Path) -> None:
    report = _report(tmp_path, make_elf(BANNER + ikconfig(INCIDENT_CONFIG)))
    text = render_text(report)
    lines = text.splitlines()
    assert lines[1] == f"format   ELF vmlinux ({report.vmlinux_bytes / 1e6:.1f} MB)"
    assert lines[2] == "version  " + BANNER.decode().removeprefix("Linux version ").rstrip()
    assert lines[-1] == f"verdict: {report.verdict}"
    for spec in OPTIONS:
        assert any(line.startswith(f"{spec.name} ") for line in lines), spec.name


def test_cli_inspect_prints_json_and_extracts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vmlinux = make_elf(BANNER + ALL_MARKERS, (PVH_NOTE,))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(gzip.compress(vmlinux)))
    out = tmp_path / "vmlinux"
    assert main(["kernel", "inspect", str(kernel), "--json", "--extract-vmlinux", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "bzImage" and report["options"]["IP_PNP"] == {
        "value": "y", "source": "evidence", "detail": '"IP-Config:" is in the image'}
    assert report["extracted_vmlinux"] == {"path": str(out), "release": "6.1.99-sample", "bytes": len(vmlinux)}
    assert out.read_bytes() == vmlinux


@pytest.mark.parametrize("data", [b"", b"garbage" * 100, make_elf(BANNER)[:90]])
def test_cli_inspect_of_a_bad_file_names_it_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], data: bytes) -> None:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(data)
    assert main(["kernel", "inspect", str(kernel)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"browservm: error: kernel {kernel}: ")
    assert "Traceback" not in captured.err
    assert main(["kernel", "inspect", str(kernel), "--json"]) == 1
    error = json.loads(capsys.readouterr().out)["error"]
    assert (error["type"], error["path"]) == ("KernelImageError", str(kernel))
