"""`browservm kernel inspect`: can this kernel boot as our Firecracker guest, and does it apply `ip=`?

Each option a microVM guest depends on is answered from the kernel's embedded
config when it carries one (CONFIG_IKCONFIG), and otherwise from evidence in
the image: a string that only the option's built-in code puts there. Evidence
shows what is built in, never what a module would add, so a missing marker of
a tristate option reads "not built in" (module or absent), and an option that
would live inside a module that is not built in reads "unknown".

The incident this exists for: a kernel without CONFIG_IP_PNP ignores `ip=`,
boots fine, and nobody can reach it. That answer is in the verdict line.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from browservm.images.kernel_config import KernelConfig, embedded_config
from browservm.images.kernel_image import BZIMAGE, KernelImage

CONFIG = "config"
EVIDENCE = "evidence"
NOT_BUILT_IN = "not built in"
UNKNOWN = "unknown"

BLOCKER = "blocker"
WARNING = "warning"
NOTE = "note"


@dataclass(frozen=True)
class OptionSpec:
    name: str  # without the CONFIG_ prefix
    what: str  # what it gives the guest, for people
    tristate: bool
    markers: tuple[bytes, ...] = ()  # only this option's built-in code puts one of these in the image
    inside: str | None = None  # the option it is part of, whose module would hold it


OPTIONS = (
    OptionSpec("IP_PNP", "kernel-level IP configuration from ip=", tristate=False, markers=(b"IP-Config:",)),
    OptionSpec("VIRTIO_MMIO", "the virtio-mmio transport", tristate=True, markers=(b"virtio-mmio\x00",)),
    OptionSpec("VIRTIO_MMIO_CMDLINE_DEVICES", "virtio-mmio devices from virtio_mmio.device= arguments",
               tristate=False, markers=(b"virtio-mmio-cmdline\x00", b"virtio_mmio.device\x00"),
               inside="VIRTIO_MMIO"),
    OptionSpec("VIRTIO_NET", "the virtio-net driver (eth0)", tristate=True, markers=(b"virtio_net.napi_tx\x00",)),
    OptionSpec("VIRTIO_BLK", "the virtio-blk driver (the root disk)", tristate=True,
               markers=(b"virtio_blk.queue_depth\x00",)),
    OptionSpec("EXT4_FS", "the ext4 filesystem (the root filesystem)", tristate=True, markers=(b"EXT4-fs error",)),
    OptionSpec("SERIAL_8250_CONSOLE", "a console on the 8250 serial port ttyS0", tristate=False,
               markers=(b"uart8250\x00",)),
    OptionSpec("ACPI", "ACPI (device and vCPU tables)", tristate=False, markers=(b"ACPI: Core revision",)),
    OptionSpec("PCI", "PCI", tristate=False, markers=(b"PCI host bridge to bus",)),
    OptionSpec("PVH", "the PVH entry point (Xen ELF note 18)", tristate=False),
)
# Without these built in the guest needs an initramfs that loads them.
BOOT_DRIVERS = ("VIRTIO_MMIO", "VIRTIO_BLK", "VIRTIO_NET", "EXT4_FS")
IGNORES_IP = "this kernel ignores ip=: CONFIG_IP_PNP is not set — the guest's own network configurator must " \
             "configure eth0"


@dataclass(frozen=True)
class OptionAnswer:
    name: str
    value: str  # "y", "m", "n" or another config value; NOT_BUILT_IN or UNKNOWN from evidence
    source: str  # CONFIG or EVIDENCE
    detail: str


@dataclass(frozen=True)
class Finding:
    severity: str  # BLOCKER, WARNING or NOTE
    message: str


@dataclass(frozen=True)
class KernelReport:
    path: str
    format: str
    release: str
    banner: str
    boot_protocol: str | None
    compression: str | None
    vmlinux_bytes: int
    config_source: str  # CONFIG when the image carries its config, else EVIDENCE
    options: tuple[OptionAnswer, ...]
    findings: tuple[Finding, ...]

    def value(self, name: str) -> str:
        return next(answer.value for answer in self.options if answer.name == name)

    @property
    def ready(self) -> bool:
        return not any(finding.severity == BLOCKER for finding in self.findings)

    @property
    def virtio_built_in(self) -> bool | None:
        values = [self.value(name) for name in ("VIRTIO_MMIO", "VIRTIO_NET", "VIRTIO_BLK")]
        return None if UNKNOWN in values else all(value == "y" for value in values)

    @property
    def needs_initramfs(self) -> bool:
        return any(self.value(name) in ("m", NOT_BUILT_IN) for name in BOOT_DRIVERS)

    @property
    def verdict(self) -> str:
        blockers = sum(finding.severity == BLOCKER for finding in self.findings)
        if blockers:
            head = f"NOT fit to boot as a Firecracker microVM guest as it is ({blockers} blocker(s) above)"
        else:
            head = "fit to boot as a Firecracker microVM guest without an initramfs"
        ip_pnp = self.value("IP_PNP")
        if ip_pnp == "y":
            return f"{head}; it applies ip= itself (CONFIG_IP_PNP=y)"
        if ip_pnp == "n":
            return f"{head}; {IGNORES_IP}"
        return f"{head}; whether it applies ip= is unknown — the guest's own network configurator must be ready"

    def to_json(self) -> dict[str, object]:
        return {
            "path": self.path, "format": self.format, "release": self.release, "banner": self.banner,
            "boot_protocol": self.boot_protocol, "compression": self.compression,
            "vmlinux_bytes": self.vmlinux_bytes, "config_source": self.config_source,
            "options": {answer.name: {"value": answer.value, "source": answer.source, "detail": answer.detail}
                        for answer in self.options},
            "virtio_built_in": self.virtio_built_in, "needs_initramfs": self.needs_initramfs,
            "findings": [asdict(finding) for finding in self.findings],
            "ready": self.ready, "verdict": self.verdict,
        }


def inspect_kernel(image: KernelImage, *, use_embedded_config: bool = True) -> KernelReport:
    """`use_embedded_config=False` answers from evidence alone (tests compare both on one kernel)."""
    config = embedded_config(image.vmlinux.image, image.path) if use_embedded_config else None
    options = _from_evidence(image) if config is None else tuple(_from_config(spec, config) for spec in OPTIONS)
    return KernelReport(
        path=image.path, format=image.format, release=image.release, banner=image.banner,
        boot_protocol=image.setup.protocol_text if image.setup else None, compression=image.compression,
        vmlinux_bytes=image.vmlinux.size, config_source=CONFIG if config is not None else EVIDENCE,
        options=options, findings=tuple(_findings(image.format, {answer.name: answer for answer in options})),
    )


def _from_config(spec: OptionSpec, config: KernelConfig) -> OptionAnswer:
    value = config.value(spec.name)
    detail = f"CONFIG_{spec.name} is not set" if value == "n" else f"CONFIG_{spec.name}={value}"
    return OptionAnswer(spec.name, value, CONFIG, detail)


def _from_evidence(image: KernelImage) -> tuple[OptionAnswer, ...]:
    data = image.vmlinux.image
    answers: dict[str, OptionAnswer] = {}
    for spec in OPTIONS:
        if spec.name == "PVH":
            answers[spec.name] = _pvh_from_notes(image)
            continue
        shown = " or ".join(_quoted(marker) for marker in spec.markers)
        if any(marker in data for marker in spec.markers):
            answers[spec.name] = OptionAnswer(spec.name, "y", EVIDENCE, f"{shown} is in the image")
        elif spec.inside is not None and answers[spec.inside].value != "y":
            answers[spec.name] = OptionAnswer(spec.name, UNKNOWN, EVIDENCE,
                                              f"it would be in the {spec.inside} module, which the image "
                                              "does not show")
        elif spec.tristate:
            answers[spec.name] = OptionAnswer(spec.name, NOT_BUILT_IN, EVIDENCE,
                                              f"no {shown} in the image: a module, or not configured")
        else:
            answers[spec.name] = OptionAnswer(spec.name, "n", EVIDENCE, f"no {shown} in the image")
    return tuple(answers[spec.name] for spec in OPTIONS)


def _quoted(marker: bytes) -> str:
    return '"' + marker.rstrip(b"\x00").decode() + '"'


def _pvh_from_notes(image: KernelImage) -> OptionAnswer:
    if image.vmlinux.has_pvh_entry:
        return OptionAnswer("PVH", "y", EVIDENCE, "the vmlinux has a Xen ELF note of type 18 (PVH entry)")
    return OptionAnswer("PVH", "n", EVIDENCE, "the vmlinux has no Xen ELF note of type 18")


def _findings(kernel_format: str, options: dict[str, OptionAnswer]) -> list[Finding]:
    findings: list[Finding] = []
    if kernel_format == BZIMAGE:
        findings.append(Finding(BLOCKER, "Firecracker on x86_64 boots an ELF vmlinux and this is a bzImage: "
                                         "unpack it with --extract-vmlinux"))
    specs = {spec.name: spec for spec in OPTIONS}
    for name in BOOT_DRIVERS:
        answer = options[name]
        finding = _missing_driver(specs[name], answer, BLOCKER)
        if finding:
            findings.append(finding)
    console = _missing_driver(specs["SERIAL_8250_CONSOLE"], options["SERIAL_8250_CONSOLE"], WARNING)
    if console:
        findings.append(Finding(WARNING, f"{console.message}; boot messages and readiness markers will not "
                                         "reach the serial console log"))
    findings.extend(_device_discovery(options["VIRTIO_MMIO_CMDLINE_DEVICES"], options["ACPI"]))
    if options["IP_PNP"].value == "n":
        findings.append(Finding(WARNING, IGNORES_IP))
    elif options["IP_PNP"].value == UNKNOWN:
        findings.append(Finding(WARNING, "cannot tell whether this kernel applies ip=: the guest's own network "
                                         "configurator must be ready to configure eth0"))
    if options["PVH"].value == "n":
        findings.append(Finding(NOTE, "no PVH entry point: Firecracker starts it through the 64-bit Linux boot "
                                      "protocol instead"))
    return findings


def _missing_driver(spec: OptionSpec, answer: OptionAnswer, severity: str) -> Finding | None:
    option = f"CONFIG_{spec.name}"
    if answer.value == "y":
        return None
    if answer.value == "m":
        return Finding(severity, f"{option}=m: {spec.what} is a module, so the guest needs an initramfs "
                                 "that loads it")
    if answer.value == NOT_BUILT_IN:
        return Finding(severity, f"{spec.what} is not built in ({option} is a module or not set): the guest "
                                 "needs an initramfs that loads it, if the module exists at all")
    if answer.value == UNKNOWN:
        return Finding(WARNING, f"cannot tell whether {spec.what} is built in ({answer.detail})")
    return Finding(severity, f"{option} is not set: the guest has no {spec.what}")


def _device_discovery(cmdline: OptionAnswer, acpi: OptionAnswer) -> list[Finding]:
    if cmdline.value == "y":
        return [] if acpi.value == "y" else [Finding(NOTE, "no ACPI: virtio-mmio devices must come from "
                                                           "virtio_mmio.device= arguments")]
    if cmdline.value == UNKNOWN:
        return [Finding(WARNING, f"cannot tell whether virtio_mmio.device= arguments are honoured "
                                 f"({cmdline.detail})")]
    if acpi.value == "y":
        return [Finding(WARNING, "virtio_mmio.device= arguments are ignored (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES "
                                 "is not set): devices are found only through ACPI, as Firecracker 1.7 and later "
                                 "describe them; QEMU's microvm with acpi=off would show none")]
    return [Finding(BLOCKER, "neither virtio_mmio.device= arguments (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) nor "
                             "ACPI: the kernel cannot find Firecracker's virtio-mmio devices")]


def render_text(report: KernelReport) -> str:
    lines = [f"kernel   {report.path}"]
    if report.format == BZIMAGE:
        lines.append(f"format   bzImage (boot protocol {report.boot_protocol}), a {report.compression}-compressed "
                     f"ELF vmlinux of {report.vmlinux_bytes / 1e6:.1f} MB inside")
    else:
        lines.append(f"format   ELF vmlinux ({report.vmlinux_bytes / 1e6:.1f} MB)")
    lines.append(f"version  {report.banner}")
    if report.config_source == CONFIG:
        lines.append("config   embedded (CONFIG_IKCONFIG=y): every answer below comes from the kernel's own config")
    else:
        lines.append("config   none embedded (no CONFIG_IKCONFIG): the answers below come from evidence in the image")
    lines += ["", f"{'option':<28} {'value':<13} {'from':<9} why"]
    lines += [f"{answer.name:<28} {answer.value:<13} {answer.source:<9} {answer.detail}" for answer in report.options]
    if report.findings:
        lines.append("")
        lines += [f"{finding.severity:<8} {finding.message}" for finding in report.findings]
    lines += ["", f"verdict: {report.verdict}"]
    return "\n".join(lines)
