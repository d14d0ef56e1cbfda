"""Which accelerator QEMU runs guests with: KVM only where a guest of this kernel runs under it to
the end, software emulation (TCG) everywhere else.

/dev/kvm being there proves little. A nested PVM device (as on our CI machines) accepts
KVM_CREATE_VM and then hangs an ordinary guest kernel; on some such machines the kernel even prints
its first lines and is then stopped by a KVM internal error that QEMU reports on its own stderr
while it keeps the VM paused. So the probe boots the kernel under KVM without a root disk and
passes only when the kernel reaches its expected end: the root-mount panic, after which
`panic=-1` and `-no-reboot` make QEMU exit by itself. Anything else (an internal error, silence,
a QEMU that exits otherwise, the deadline) means TCG, with the evidence kept as the reason.

The choice is cached per kernel and host boot. A VM that later stops under KVM demotes its kernel
to TCG (`demote`): the cache then says TCG, with why, for every later VM of that boot.
`--accel kvm|tcg` (BROWSERVM_ACCEL) overrides all of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import selectors
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from browservm.errors import InvalidInput, VmmError
from browservm.progress import cache_dir
from browservm.vmm.process import VMM_ENVIRONMENT
from browservm.vmm.qemu import without_dumps

AccelMode = Literal["auto", "kvm", "tcg"]
MODES: tuple[AccelMode, ...] = ("auto", "kvm", "tcg")
PROBE_TIMEOUT_S = 10.0
# What the kernel prints when it reaches the end the probe asks of it (no root disk: it cannot mount one).
EXPECTED_END = "Kernel panic - not syncing"
INTERNAL_ERROR = "KVM internal error"
_EVIDENCE = 400  # characters of QEMU's own words and of the last console line kept in a reason
_READ = 65536
_MAX_OUTPUT = 1 << 20  # a probe kernel's whole console is a few KiB
_WORDS_AFTER_ERROR_S = 0.5


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why: the probe's evidence, the cache's record of it, or the setting


def qemu_words(stderr: str) -> str:
    """What QEMU said on its stderr, without the register and data dumps that follow a KVM error."""
    return "; ".join(line.strip() for line in without_dumps(stderr.splitlines()))[:_EVIDENCE]


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:_EVIDENCE] if lines else ""


def probe_verdict(console: str, stderr: str, exit_code: int | None, seconds: float, timeout: float) -> Accel:
    """What one KVM probe boot showed (a value: tested without running anything).

    `exit_code` is None when QEMU was still running at the end (it was killed).
    """
    qemu_said = qemu_words(stderr)
    last = last_line(console)
    after = f"after the kernel's line {last!r}" if last else "before the kernel printed anything"
    if INTERNAL_ERROR in stderr:
        return Accel("tcg", f"KVM stopped a probe guest of this kernel {after}: QEMU said {qemu_said!r}")
    if exit_code is None:
        if not last:
            return Accel("tcg", f"under KVM this kernel printed nothing within {timeout:g} s (/dev/kvm may only "
                                "run specially built guests, e.g. a nested PVM device)")
        return Accel("tcg", f"under KVM this kernel stalled: no panic within {timeout:g} s, its last line was "
                            f"{last!r}")
    if EXPECTED_END in console:
        return Accel("kvm", f"KVM ran a probe guest of this kernel to its expected end (the root-mount panic) "
                            f"in {seconds:.1f} s")
    return Accel("tcg", f"QEMU exited with code {exit_code} under KVM {after}, before the kernel's expected end"
                        + (f": QEMU said {qemu_said!r}" if qemu_said else ""))


class AccelProbe:
    """The accelerator for a kernel: the setting, or the cached verdict of a probe boot (made once)."""

    def __init__(self, qemu: str, mode: AccelMode = "auto", cache: Path | None = None,
                 timeout: float = PROBE_TIMEOUT_S, kvm_device: str = "/dev/kvm") -> None:
        if mode not in MODES:
            raise InvalidInput("accel", mode, "must be auto, kvm or tcg")
        self._qemu = qemu
        self.mode: AccelMode = mode
        self._cache_file = cache
        self._timeout = timeout
        self._kvm_device = kvm_device

    @property
    def _cache(self) -> Path:
        # Resolved at first use, not at construction: whoever only reads settings needs no cache.
        return self._cache_file or cache_dir("accel") / "accel.json"

    def choose(self, kernel: Path) -> Accel:
        if self.mode == "tcg":
            return Accel("tcg", "set by --accel tcg (BROWSERVM_ACCEL)")
        usable = os.access(self._kvm_device, os.R_OK | os.W_OK)
        if self.mode == "kvm":
            if not usable:
                raise VmmError("-", "accel", f"--accel kvm, but {self._kvm_device} is missing or not accessible")
            return Accel("kvm", "set by --accel kvm (BROWSERVM_ACCEL): not probed")
        if not usable:
            return Accel("tcg", f"{self._kvm_device} is missing or not accessible")
        key = self._key(kernel)
        cached = self._read_cache().get(key)
        if cached is not None:
            return Accel(cached["name"], cached["reason"])
        accel = self.probe(kernel)
        self._write(key, accel)
        return accel

    def summary(self) -> str:
        """The setting and what it chose this boot, in words (host status, /readyz, the doctor)."""
        if self.mode != "auto":
            return f"{self.mode}: set by --accel {self.mode} (BROWSERVM_ACCEL)"
        if not os.access(self._kvm_device, os.R_OK | os.W_OK):
            return f"auto: tcg: {self._kvm_device} is missing or not accessible"
        known = self.known()
        if not known:
            return ("auto: not probed yet: the first VM's kernel is booted under KVM once, and TCG is chosen "
                    "unless it runs there to its expected end")
        return "; ".join(f"auto: {accel.name} for kernel {digest}: {accel.reason}" for digest, accel in known.items())

    def known(self) -> dict[str, Accel]:
        """This boot's cached verdicts, by kernel digest: what `host status` and the doctor report."""
        boot = _boot_id() + "/"
        return {key.removeprefix(boot): Accel(entry["name"], entry["reason"])
                for key, entry in self._read_cache().items() if key.startswith(boot)}

    def demote(self, kernel: Path, reason: str) -> bool:
        """Stop choosing KVM for `kernel` (a guest of it stopped under KVM); False when the mode is not
        auto (a setting is obeyed) or TCG was already the choice."""
        if self.mode != "auto":
            return False
        key = self._key(kernel)
        cached = self._read_cache().get(key)
        if cached is not None and cached["name"] == "tcg":
            return False
        self._write(key, Accel("tcg", f"{reason} (at {time.strftime('%Y-%m-%d %H:%M:%S')}; the probe had "
                                      "chosen KVM)"))
        return True

    def probe(self, kernel: Path) -> Accel:
        """Boot `kernel` under KVM without a root disk, until its expected end, a KVM internal error or
        the deadline. Blocking."""
        argv = [self._qemu, "-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host", "-m", "128M",
                "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                "-kernel", str(kernel), "-append", "console=ttyS0 panic=-1 reboot=t"]
        started = time.monotonic()
        try:
            # A VMM's environment, not the controller's (which holds its keys): see process.VMM_ENVIRONMENT.
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=dict(VMM_ENVIRONMENT))
        except OSError as exc:
            raise VmmError("-", "probe KVM", f"cannot run {self._qemu}: {exc.strerror}") from exc
        assert child.stdout is not None and child.stderr is not None
        output = {child.stdout: b"", child.stderr: b""}
        with selectors.DefaultSelector() as selector:
            for stream in output:
                selector.register(stream, selectors.EVENT_READ)
            deadline = started + self._timeout
            # Until both pipes close (QEMU exited), or shortly after QEMU reports the guest stopped (the
            # rest of its words follow the first line): it would keep the VM paused until the deadline.
            while selector.get_map():
                if INTERNAL_ERROR.encode() in output[child.stderr]:
                    deadline = min(deadline, time.monotonic() + _WORDS_AFTER_ERROR_S)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                for key, _ in selector.select(remaining):
                    chunk = os.read(key.fd, _READ)
                    stream = child.stdout if key.fileobj is child.stdout else child.stderr
                    if not chunk or len(output[stream]) > _MAX_OUTPUT:
                        selector.unregister(stream)
                    else:
                        output[stream] += chunk
            selector_open = bool(selector.get_map())
        code: int | None = None
        try:
            if not selector_open and INTERNAL_ERROR.encode() not in output[child.stderr]:
                code = child.wait(timeout=5)  # both pipes closed: QEMU is exiting
        except subprocess.TimeoutExpired:
            pass
        finally:
            if code is None:  # still running: it did not end by itself (a stopped guest, a stall)
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()
        console, stderr = (output[stream].decode(errors="replace") for stream in (child.stdout, child.stderr))
        return probe_verdict(console, stderr, code, time.monotonic() - started, self._timeout)

    def _key(self, kernel: Path) -> str:
        try:
            digest = hashlib.sha256(kernel.read_bytes()).hexdigest()[:16]
        except OSError as exc:
            raise VmmError("-", "probe KVM", f"cannot read the kernel {kernel}: {exc.strerror}") from exc
        return f"{_boot_id()}/{digest}"

    def _read_cache(self) -> dict[str, dict[str, str]]:
        try:
            entries = json.loads(self._cache.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def _write(self, key: str, accel: Accel) -> None:
        entries = self._read_cache()
        entries[key] = {"name": accel.name, "reason": accel.reason}
        try:
            self._cache.parent.mkdir(parents=True, exist_ok=True)
            partial = self._cache.with_suffix(".partial")
            partial.write_text(json.dumps(entries, indent=2))
            os.replace(partial, self._cache)
        except OSError as exc:
            raise VmmError("-", "accel", f"cannot write the accelerator cache {self._cache}: {exc.strerror}") from exc


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
