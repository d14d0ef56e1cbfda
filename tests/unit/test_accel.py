"""The accelerator choice against fake QEMUs: a kernel that prints `Linux version` then stalls, one
that QEMU stops with a KVM internal error (and keeps paused), one that runs to the root-mount panic,
and a QEMU that cannot use KVM at all; the cache, the demotion and the setting. This machine's real
/dev/kvm: tests/integration/test_accel_real.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import cast

import pytest

from browservm.errors import InvalidInput, VmmError
from browservm.vmm.accel import AccelMode, AccelProbe, probe_verdict, qemu_words

BANNER = "[    0.000000] Linux version 6.1.192 (browservm@browservm)"
XSAVE = "[    3.734144] x86/fpu: Supporting XSAVE feature 0x080: 'AVX-512 ZMM_Hi256'"
INTERNAL = ("KVM internal error. Suberror: 1\\nextra data[0]: 0x0000000000000001\\nemulation failure\\n"
            "RAX=00000000000000e7 RBX=0000000000000980\\nES =0000 0000000000000000\\nCode=0f 48 ae\\n")


def fake_qemu(tmp_path: Path, body: str) -> Path:
    """A stand-in `qemu-system-x86_64`: a script that records each run and then does `body`."""
    script = tmp_path / "qemu"
    script.write_text(f"#!/bin/sh\necho run >> {tmp_path / 'runs'}\n{body}\n")
    script.chmod(0o755)
    return script


STALLS = f"echo '{BANNER}'; echo '{XSAVE}'; exec sleep 60"
STOPPED = f"echo '{BANNER}'; echo '{XSAVE}'; printf '{INTERNAL}' >&2; exec sleep 60"  # kept paused
PANICS = (f"echo '{BANNER}'; echo '[    0.55] VFS: Unable to mount root fs on unknown-block(0,0)';"
          "echo '[    0.55] Kernel panic - not syncing: VFS: Unable to mount root fs'; exit 0")
NO_KVM = "echo 'Could not access KVM kernel module: Permission denied' >&2; exit 1"


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"a kernel")
    return path


@pytest.fixture
def kvm(tmp_path: Path) -> str:
    """A stand-in /dev/kvm this process may open (the probe only checks access)."""
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    return str(device)


def probe(tmp_path: Path, body: str, kvm: str, timeout: float = 2.0, mode: str = "auto") -> AccelProbe:
    return AccelProbe(str(fake_qemu(tmp_path, body)), cast(AccelMode, mode), cache=tmp_path / "accel.json",
                      timeout=timeout, kvm_device=kvm)


def test_a_kernel_that_prints_its_banner_then_stalls_is_tcg_with_its_last_line(tmp_path: Path, kernel: Path,
                                                                             kvm: str) -> None:
    accel = probe(tmp_path, STALLS, kvm).probe(kernel)
    assert accel.name == "tcg"
    assert "stalled" in accel.reason and "no panic within 2 s" in accel.reason and "XSAVE feature 0x080" in accel.reason


def test_a_kvm_internal_error_is_tcg_at_once_in_qemus_own_words(tmp_path: Path, kernel: Path, kvm: str) -> None:
    started = time.monotonic()
    accel = probe(tmp_path, STOPPED, kvm, timeout=30).probe(kernel)
    assert time.monotonic() - started < 10  # not the deadline: QEMU keeps such a guest paused
    assert accel.name == "tcg"
    assert "KVM internal error. Suberror: 1; emulation failure" in accel.reason
    assert "XSAVE feature 0x080" in accel.reason and "RAX=" not in accel.reason and "extra data" not in accel.reason


def test_a_kernel_that_reaches_its_expected_end_is_kvm(tmp_path: Path, kernel: Path, kvm: str) -> None:
    accel = probe(tmp_path, PANICS, kvm).probe(kernel)
    assert accel.name == "kvm" and "expected end" in accel.reason


def test_a_qemu_that_cannot_use_kvm_is_tcg_with_its_words(tmp_path: Path, kernel: Path, kvm: str) -> None:
    accel = probe(tmp_path, NO_KVM, kvm).probe(kernel)
    assert accel.name == "tcg" and "exited with code 1" in accel.reason
    assert "Could not access KVM kernel module" in accel.reason


def test_the_choice_is_probed_once_then_cached_and_a_demotion_sticks(tmp_path: Path, kernel: Path, kvm: str) -> None:
    chooser = probe(tmp_path, PANICS, kvm)
    assert chooser.choose(kernel).name == "kvm"
    assert chooser.choose(kernel).name == "kvm"
    assert (tmp_path / "runs").read_text().count("run") == 1
    assert "auto: kvm for kernel" in chooser.summary()
    assert chooser.demote(kernel, "a guest of this kernel stopped under KVM (vmm.stopped: ...)")
    again = probe(tmp_path, PANICS, kvm).choose(kernel)  # another process: the cache says it
    assert again.name == "tcg" and "stopped under KVM" in again.reason and "the probe had chosen KVM" in again.reason
    assert not chooser.demote(kernel, "twice")  # already TCG
    assert (tmp_path / "runs").read_text().count("run") == 1


def test_the_setting_wins_over_the_probe(tmp_path: Path, kernel: Path, kvm: str) -> None:
    tcg = probe(tmp_path, PANICS, kvm, mode="tcg")
    assert tcg.choose(kernel).name == "tcg" and "--accel tcg" in tcg.choose(kernel).reason
    forced = probe(tmp_path, STALLS, kvm, mode="kvm")
    assert forced.choose(kernel).name == "kvm" and not forced.demote(kernel, "stopped")
    assert not (tmp_path / "runs").exists()  # neither probed
    with pytest.raises(VmmError, match=r"--accel kvm, but .* is missing"):
        probe(tmp_path, PANICS, str(tmp_path / "no-kvm"), mode="kvm").choose(kernel)
    with pytest.raises(InvalidInput) as refused:
        probe(tmp_path, PANICS, kvm, mode="fast")
    assert refused.value.field == "accel"


def test_without_a_usable_dev_kvm_it_is_tcg_without_a_probe(tmp_path: Path, kernel: Path) -> None:
    chooser = probe(tmp_path, PANICS, str(tmp_path / "missing"))
    accel = chooser.choose(kernel)
    assert accel.name == "tcg" and "missing or not accessible" in accel.reason
    assert not (tmp_path / "runs").exists()
    assert "missing or not accessible" in chooser.summary()


def test_verdicts_as_values() -> None:
    assert probe_verdict("", "", None, 10.0, 10.0).reason.startswith("under KVM this kernel printed nothing")
    assert probe_verdict(f"{BANNER}\n", "", 0, 0.5, 10.0).name == "tcg"  # exited, but not at its end
    assert qemu_words("KVM internal error. Suberror: 1\nextra data[0]: 0x1\nemulation failure\nRAX=1 RBX=2\n") == \
        "KVM internal error. Suberror: 1; emulation failure"
    assert qemu_words("") == ""
