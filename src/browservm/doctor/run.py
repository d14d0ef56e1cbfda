"""The doctor: the investigation of the incident done by the program, read-only and bounded.

    host   host.netns host.bridge host.forwarding host.firewall host.uplink   the VM network
           host.vmm host.kernel host.image                                    what VMs would boot with
    VM     the host network pieces, then the VM's hops in order (vm/hops.py):
           vmm.spawn  the VMM is alive (PID and start time) and uses the record's TAP, MAC and ip=
           net.tap    every property `vm create` set on the TAP, as hostnet/expected.py describes it
                      (doctor/props.py); no other record or neighbour entry claims the VM's address or MAC
           guest.network  the console's IP-Config or browservm-net line (which, and what it set)
           net.arp    ARP on the bridge answered from the VM's MAC
           desktop.ready  the desktop supervisor's marker for the VM's desktop path's listener
           net.tcp  ws.upgrade  rfb.banner   through the readiness probes (vm/readiness.py); ws.upgrade
                      only on the websockify path (vm/desktop_path.py)
           desktop.complete  the supervisor's last marker
The host pieces compare every property `host up` set with what is there, from the same
description (a changed one is named with the expected and the found value).
The VM walk stops at the first failing hop (later ones are `skipped`); host pieces are all
checked. The verdict is the first failure in that order, with its cause code (causes.py).

Read-only: netlink dumps, /proc, `nft -j list ruleset`, `debugfs` without -w, the console file,
and the readiness probes' own packets (ARP requests from the bridge, TCP connects from the VM
namespace). Bounded: every step has a deadline, and blocking work runs in daemon threads, so a
hung `nft` or netlink call costs its deadline and never holds up the answer or the process exit.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path
from typing import Protocol, TypeVar

from browservm.doctor.hostview import HostView, foreign_drop_policies, foreign_drops, read_host_view
from browservm.doctor.images import ImageFacts, KernelFacts, inspect_image, inspect_kernel_file
from browservm.doctor.props import firewall_properties, host_properties, port_properties
from browservm.doctor.report import (
    FAIL,
    HOST_BRIDGE,
    HOST_FIREWALL,
    HOST_FORWARDING,
    HOST_IMAGE,
    HOST_KERNEL,
    HOST_NETNS,
    HOST_UPLINK,
    HOST_VMM,
    SKIPPED,
    Finding,
    HopResult,
    Report,
)
from browservm.doctor.vmmview import VmmView, read_vmm_view
from browservm.errors import BrowserVMError, ProbeFailed, VmNotFound
from browservm.guest.bootargs import BootArgsError, ip_config_from_cmdline
from browservm.guest.markers import parse_marker
from browservm.guest.netconfig import DISABLE_WORD
from browservm.hostnet.expected import Expectation, plan_expectation
from browservm.hostnet.host import Check
from browservm.hostnet.netns import NetworkNamespace
from browservm.ids import validate_vm_id
from browservm.netplan import NetworkPlan
from browservm.vm import hops
from browservm.vm.desktop_path import PATHS, desktop_path
from browservm.vm.readiness import IP_IGNORED, DesktopConnection, GuestNetwork, arp_probe, guest_network_line
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmm import firecracker, process
from browservm.vmm.accel import AccelMode, AccelProbe
from browservm.vmm.placement import choose_placement
from browservm.vmm.process import VmmProcess
from browservm.vmm.qemu import QEMU

T = TypeVar("T")
CONSOLE_HEAD = CONSOLE_TAIL = 1 << 20  # bytes of a console read from each end: the guest writes it
_VM_HOPS = (hops.VMM_SPAWN, hops.NET_TAP, hops.GUEST_NETWORK, hops.NET_ARP, hops.DESKTOP_READY, hops.NET_TCP,
            hops.WS_UPGRADE, hops.RFB_BANNER, hops.DESKTOP_COMPLETE)


@dataclass(frozen=True)
class Deadlines:
    """Seconds each step may take. Passing steps take milliseconds and the walk stops at the first
    failure, so one VM's run stays far below the sum (the worst case is about 4.5 s)."""

    host: float = 1.5  # the namespace snapshot and `host status`, side by side
    vmm: float = 0.5
    console: float = 0.5
    images: float = 1.0  # kernel inspect + debugfs, only to explain a guest.network failure
    arp: float = 1.0
    tcp: float = 1.0
    websocket: float = 1.0
    rfb: float = 1.0
    version: float = 1.0  # `qemu --version` and the like, in the host run


class DoctorTimeout(BrowserVMError):
    def __init__(self, what: str, seconds: float) -> None:
        self.what = what
        self.seconds = seconds
        super().__init__(f"{what} did not finish within {seconds:g} s")


async def bounded(work: Callable[[], T], timeout: float, what: str) -> T:
    """Run blocking `work` in a daemon thread of its own; DoctorTimeout at the deadline.

    Not asyncio.to_thread: the default executor's threads are joined at exit, so one hung call would
    keep a finished CLI run alive; a daemon thread that outlives its deadline is simply left behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result = work()
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            loop.call_soon_threadsafe(settle, None, exc)
            return
        loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=target, name=f"doctor {what}", daemon=True).start()
    try:
        async with asyncio.timeout(timeout):
            return await future
    except TimeoutError:
        raise DoctorTimeout(what, timeout) from None


class VmmInspector(Protocol):
    """How the doctor looks at a VM's VMM (DriverVmms is the real one; tests of a stand-in guest give
    their own). Blocking."""

    def alive(self, record: VmRecord) -> bool: ...

    def view(self, record: VmRecord) -> VmmView: ...


class DriverVmms:
    """The VMM as the driver recognises it (process.is_vmm_of), and its config read from /proc or its file."""

    def __init__(self, jail_root: Callable[[str], Path | None] | None = None) -> None:
        self._jail_root = jail_root

    def alive(self, record: VmRecord) -> bool:
        assert record.pid is not None and record.pid_start_time is not None
        return process.is_vmm_of(VmmProcess(record.pid, record.pid_start_time), Path(record.directory),
                                 self._jail(record))

    def view(self, record: VmRecord) -> VmmView:
        assert record.pid is not None and record.pid_start_time is not None
        return read_vmm_view(VmmProcess(record.pid, record.pid_start_time), Path(record.directory),
                             self._jail(record))

    def _jail(self, record: VmRecord) -> Path | None:
        return None if self._jail_root is None else self._jail_root(record.vm_id)


@dataclass
class Sources:
    """Where the doctor reads from; blocking callables, run in threads with deadlines."""

    plan: NetworkPlan
    netns: NetworkNamespace
    vmm_choice: str  # settings.vmm: auto, firecracker or qemu
    kernel: Path | None  # settings.kernel: None means browservm's own
    rootfs: Path | None
    status: Callable[[], list[Check]] | None  # HostNetwork.status; None without a state directory
    record: Callable[[str], Awaitable[VmRecord | None]] | None  # the store's record of a VM
    records: Callable[[], Awaitable[list[VmRecord]]] | None
    vmms: VmmInspector
    qemu: str = QEMU
    firecracker: str = firecracker.FIRECRACKER
    # HostNetwork.expected: what this state directory set; None: only what the plan alone says.
    expected: Callable[[], Expectation] | None = None
    accel: AccelMode = "auto"  # settings.accel


class Doctor:
    def __init__(self, sources: Sources, deadlines: Deadlines | None = None) -> None:
        self._s = sources
        self._d = deadlines or Deadlines()

    # --- the host --------------------------------------------------------------------------

    async def host(self) -> Report:
        """Every piece the VMs depend on, and what a VM would boot with."""
        started = time.monotonic()
        (view, checks, status_error, expectation, read), vmm, images = await asyncio.gather(
            self._host_state(), self._vmm_piece(), self._images_pieces())
        results = [*self._network_pieces(view, checks, status_error, expectation, read, for_vm=False), vmm,
                   *images]
        return Report("host", None, results, time.monotonic() - started)

    async def _host_state(self) -> tuple[HostView | None, list[Check], str | None, Expectation, float]:
        """The namespace snapshot, `host status` and what was set, side by side; and how long that took."""
        started = time.monotonic()
        async def view() -> HostView | None:
            try:
                return await bounded(lambda: read_host_view(self._s.netns), self._d.host, "reading the namespace")
            except DoctorTimeout:
                return None

        async def status() -> tuple[list[Check], str | None]:
            if self._s.status is None:
                return [], None
            try:
                return await bounded(self._s.status, self._d.host, "host status"), None
            except (BrowserVMError, OSError) as exc:
                return [], str(exc)
            except Exception as exc:  # SQLite's and netlink's own errors: evidence, not a crash
                return [], f"{type(exc).__name__}: {exc}"

        async def expected() -> tuple[Expectation, str | None]:
            fallback = plan_expectation(self._s.plan, self._s.netns.name)
            if self._s.expected is None:
                return fallback, None
            try:
                return await bounded(self._s.expected, self._d.host, "what `host up` set"), None
            except (BrowserVMError, OSError) as exc:
                return fallback, str(exc)
            except Exception as exc:  # SQLite's own errors: evidence, not a crash
                return fallback, f"{type(exc).__name__}: {exc}"

        snapshot, (checks, error), (expectation, expected_error) = await asyncio.gather(view(), status(), expected())
        return snapshot, checks, error or expected_error, expectation, time.monotonic() - started

    def _network_pieces(self, view: HostView | None, checks: list[Check], status_error: str | None,
                        expectation: Expectation, seconds: float, *, for_vm: bool) -> list[HopResult]:
        """The host network's pieces, judged from one snapshot: each carries the snapshot's time."""
        netns = HopResult(HOST_NETNS, seconds=seconds)
        pieces = [netns] + [HopResult(name, seconds=seconds)
                            for name in (HOST_BRIDGE, HOST_FORWARDING, HOST_FIREWALL, HOST_UPLINK)]
        if view is None:
            netns.found(Finding("probe.error", f"reading the VM network's namespace took over {self._d.host:g} s"))
            for piece in pieces[1:]:
                piece.status = SKIPPED
            return pieces
        name = self._s.netns.name
        netns.checked.append(f"namespace {name} exists" if name else "the VM network is in this host's own namespace")
        if not view.netns_exists:
            netns.found(Finding("netns.missing", f"the namespace {name} does not exist: nothing of the VM network "
                                                 "is there", [f"/run/netns/{name} is missing"]))
            for piece in pieces[1:]:
                piece.status = SKIPPED
            return pieces
        for error in view.errors:
            netns.found(Finding("probe.error", "part of the namespace could not be read", [error], fatal=False))
        if self._s.status is None:
            netns.found(Finding("state.missing", "this state directory has no database: `host up` never ran with it",
                                fatal=False))
        elif status_error is not None:
            netns.found(Finding("probe.error", "`host status` could not run", [status_error], fatal=False))
        bridge, _, firewall, uplink = pieces[1:]
        # Every property `host up` set, from the host network's own description (doctor/props.py).
        host_properties(expectation, view, {piece.hop: piece for piece in pieces})
        self._bridges(view, bridge)
        self._firewall(view, checks, expectation, firewall, for_vm)
        self._uplink(view, uplink)
        self._other_checks(checks, bridge, firewall, for_vm)
        return pieces

    def _bridges(self, view: HostView, result: HopResult) -> None:
        """No other link in the VM subnet (what the bridges themselves carry is in host_properties)."""
        plan = self._s.plan
        ours = set(plan.bridges)
        result.checked.append(f"no other link carries an address in {plan.subnet}")
        for other in view.links.values():
            if other.name in ours:
                continue
            for address in view.addresses.get(other.index, []):
                if address.network.overlaps(plan.subnet):
                    result.found(Finding("bridge.address_elsewhere",
                                         f"{other.name} carries {address}, inside the VM subnet {plan.subnet}",
                                         [f"{other.name}: {address}"]))

    def _firewall(self, view: HostView, checks: list[Check], expectation: Expectation, result: HopResult,
                  for_vm: bool) -> None:
        from browservm.hostnet.firewall import TABLES  # noqa: PLC0415 - one name, kept next to its only use

        plan = self._s.plan
        if view.ruleset is None:
            result.found(Finding("probe.error", "the nftables ruleset could not be listed", fatal=False))
            return
        present = view.our_tables()
        missing = [f"{family} {table}" for family, table in TABLES if (family, table) not in present]
        result.checked.append(f"browservm's tables present: {', '.join(f'{f} {t}' for f, t in TABLES)}")
        if missing:
            result.found(Finding("nft.table_missing", f"browservm's nftables table {', '.join(missing)} is missing",
                                 [f"nft list ruleset has no table {name}" for name in missing]))
        named = not missing and firewall_properties(expectation, view, result)
        for check in checks:
            # What the named differences do not cover: another configuration, an interrupted install.
            if check.piece.startswith("nftables") and not check.ok and not missing and not named:
                result.found(Finding("nft.table_changed", "browservm's nftables tables are not as `host up` "
                                     f"wrote them: {check.detail}", [f"{check.piece}: {check.detail}"]))
        result.checked.append("equal to what `host up` would write" if checks else
                              "equal to what `host up` would write: not checked (no state directory)")
        # A rule that drops the subnet or a bridge matches for every port: listed once.
        drops = list(dict.fromkeys(drop for path in PATHS.values()
                                   for drop in foreign_drops(view.ruleset, plan.subnet, plan.bridges, path.port)))
        ports = ", ".join(f":{path.port}" for path in PATHS.values())
        result.checked.append(f"no rule outside browservm's tables drops {ports}, {plan.subnet} or "
                              f"{', '.join(plan.bridges)}")
        if drops:
            evidence = list(drops)
            if view.sysctls.get("net.bridge.bridge-nf-call-iptables") == "1":
                evidence.append("net.bridge.bridge-nf-call-iptables = 1: bridged traffic passes these hooks too")
            # For a VM the probes show whether the rule bites (net.tcp then names it); the host alone can't tell.
            result.found(Finding("firewall.foreign_drop", f"{len(drops)} rule(s) outside browservm's tables drop "
                                                          "VM traffic", evidence, fatal=not for_vm))
        policies = foreign_drop_policies(view.ruleset)
        if policies:
            result.found(Finding("firewall.foreign_policy", "a base chain outside browservm's tables drops by "
                                                            "policy", policies, fatal=False))

    def _uplink(self, view: HostView, result: HopResult) -> None:
        uplink = self._s.plan.uplink
        if uplink is None:
            result.checked.append("no --uplink configured: VMs reach only the host")
            return
        link = view.links.get(uplink)
        result.checked.append(f"uplink {uplink} exists and is up")
        if link is None:
            result.found(Finding("uplink.missing", f"the uplink {uplink} does not exist: VM traffic has no way out",
                                 [f"no link named {uplink} in the namespace"]))
        elif not link.up:
            result.found(Finding("uplink.down", f"the uplink {uplink} is down", [f"{uplink}: no IFF_UP"]))

    def _other_checks(self, checks: list[Check], bridge: HopResult, firewall: HopResult, for_vm: bool) -> None:
        """What `host status` finds wrong that no piece above covers (its list grows): named, not lost."""
        known = ("netns", "sysctl", "bridge ", "nftables", "routing rule", "uplink")
        for check in checks:
            if check.ok or check.piece.startswith(known):
                continue
            per_vm = check.piece.startswith(("tap ", "lease "))
            if per_vm and for_vm:
                continue  # the VM's own TAP is checked at net.tcp's side; others' are not this VM's problem
            target = firewall if "nft" in check.piece or "rule" in check.piece else bridge
            target.found(Finding("host.check_failed", f"{check.piece}: {check.detail}",
                                 [f"host status: {check.piece}: {check.detail}"], fatal=False))

    async def _vmm_piece(self) -> HopResult:
        result = HopResult(HOST_VMM)
        started = time.monotonic()
        choice = self._s.vmm_choice
        usable, reason = firecracker.available(self._s.firecracker)
        if choice == "firecracker" or (choice == "auto" and usable):
            result.checked.append(f"--vmm {choice}: {self._s.firecracker} and /dev/kvm")
            if not usable:
                code = "vmm.missing" if shutil.which(self._s.firecracker) is None else "vmm.unusable"
                result.found(Finding(code, f"Firecracker cannot run here: {reason}", [reason]))
            else:
                result.checked.append(await self._version(self._s.firecracker))
        else:
            result.checked.append(f"--vmm {choice}: {self._s.qemu}" + (f" (Firecracker: {reason})"
                                                                       if choice == "auto" else ""))
            if shutil.which(self._s.qemu) is None:
                result.found(Finding("vmm.missing", f"no {self._s.qemu} on PATH: no VM can start",
                                     [f"PATH={os.environ.get('PATH', '')}"]))
            else:
                result.checked.append(await self._version(self._s.qemu))
                probe = AccelProbe(self._s.qemu, self._s.accel)
                summary = await bounded(probe.summary, self._d.version, "the accelerator's cached choice")
                result.checked.append(f"accelerator: {summary}")
        # Not a fault on the path to a desktop, but what an operator must know about a hostile guest.
        placement = await bounded(choose_placement, self._d.version, "where VMMs run (cgroups)")
        result.checked.append(f"VMM placement: {placement.reason}")
        result.seconds = time.monotonic() - started
        return result

    async def _version(self, binary: str) -> str:
        def run() -> str:
            done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=self._d.version,
                                  check=False)
            return (done.stdout.strip().splitlines() or [f"exit {done.returncode}"])[0]
        try:
            return f"version: {await bounded(run, self._d.version + 0.5, f'{binary} --version')}"
        except (BrowserVMError, OSError, subprocess.TimeoutExpired) as exc:
            return f"version: unknown ({exc})"

    async def _images_pieces(self) -> list[HopResult]:
        kernel_result, image_result = HopResult(HOST_KERNEL), HopResult(HOST_IMAGE)
        started = time.monotonic()
        kernel, image = await asyncio.gather(self.kernel_facts(self._s.kernel), self.image_facts(self._s.rootfs))
        if kernel is None:
            kernel_result.checked.append("no --kernel: browservm's own kernel (CONFIG_IP_PNP=y) is built or taken "
                                         "from the cache at the first create")
        else:
            self._judge_kernel(kernel, kernel_result)
        if image is None:
            image_result.checked.append("no --rootfs: browservm's own image (with browservm-net) is built or taken "
                                        "from the cache at the first create")
        else:
            self._judge_image(image, image_result)
            if image.has_configurator is False and kernel is not None and kernel.ip_pnp == "n":
                image_result.found(Finding(
                    "guest.no_network_config", "the kernel ignores ip= (no CONFIG_IP_PNP) and the image has no "
                    "network configurator: every VM would come up unreachable",
                    [f"{kernel.path}: CONFIG_IP_PNP is not set", image.detail]))
        kernel_result.seconds = image_result.seconds = time.monotonic() - started
        return [kernel_result, image_result]

    async def kernel_facts(self, path: Path | None) -> KernelFacts | None:
        if path is None:
            return None
        try:
            return await bounded(lambda: inspect_kernel_file(path), self._d.images, "kernel inspect")
        except DoctorTimeout as exc:
            return KernelFacts(str(path), None, str(exc))

    async def image_facts(self, path: Path | None) -> ImageFacts | None:
        if path is None:
            return None
        try:
            return await bounded(lambda: inspect_image(path), self._d.images, "debugfs")
        except DoctorTimeout as exc:
            return ImageFacts(str(path), None, str(exc))

    @staticmethod
    def _judge_kernel(kernel: KernelFacts, result: HopResult) -> None:
        result.checked.append(f"kernel inspect {kernel.path}: CONFIG_IP_PNP, virtio built in, fit to boot")
        if kernel.report is None:
            code = "kernel.missing" if kernel.error == "no such file" else "kernel.unreadable"
            result.found(Finding(code, f"{kernel.path}: {kernel.error}"))
            return
        report = kernel.report
        result.checked.append(f"{report.banner}: {report.verdict}")
        if not report.ready:
            result.found(Finding("kernel.unfit", report.verdict,
                                 [f.message for f in report.findings if f.severity == "blocker"]))
        if report.value("IP_PNP") == "n":
            result.found(Finding("kernel.no_ip_pnp", "this kernel ignores ip= (no CONFIG_IP_PNP): only the image's "
                                 "configurator can configure eth0", [f"{kernel.path}: CONFIG_IP_PNP is not set"],
                                 fatal=False))

    @staticmethod
    def _judge_image(image: ImageFacts, result: HopResult) -> None:
        result.checked.append(f"{image.path} carries {'/usr/lib/browservm/bin/browservm-net'} (debugfs, read-only)")
        if image.detail == "no such file":
            result.found(Finding("image.missing", f"{image.path}: no such file"))
        elif image.has_configurator is None:
            result.found(Finding("image.unreadable", image.detail, fatal=False))
        elif not image.has_configurator:
            result.found(Finding("guest.no_configurator", "the image has no network configurator (browservm-net): "
                                 "only a kernel with CONFIG_IP_PNP can configure eth0", [image.detail], fatal=False))
        else:
            result.checked.append(image.detail)

    # --- one VM ----------------------------------------------------------------------------

    async def vm(self, vm_id: str) -> Report:
        """Walk one VM's hops in order, from its record, its console and live probes."""
        started = time.monotonic()
        validate_vm_id(vm_id)
        if self._s.record is None:
            raise VmNotFound(vm_id)
        try:
            async with asyncio.timeout(self._d.host):
                record = await self._s.record(vm_id)
        except TimeoutError:
            raise DoctorTimeout("reading the VM's record", self._d.host) from None
        if record is None:
            raise VmNotFound(vm_id)
        (view, checks, status_error, expectation, read), others = await asyncio.gather(self._host_state(),
                                                                                       self._other_records())
        pieces = self._network_pieces(view, checks, status_error, expectation, read, for_vm=True)
        walk = _Walk(self, record, view, others, expectation)
        results = pieces + await walk.run()
        return Report("vm", vm_id, results, time.monotonic() - started)

    async def _other_records(self) -> list[VmRecord]:
        if self._s.records is None:
            return []
        try:
            async with asyncio.timeout(self._d.host):
                return await self._s.records()
        except (TimeoutError, BrowserVMError, OSError):
            return []  # only for conflicts between records: the walk goes on without them

    @property
    def sources(self) -> Sources:
        return self._s

    @property
    def deadlines(self) -> Deadlines:
        return self._d


class _Walk:
    """One VM's hops in order; stops at the first failure."""

    def __init__(self, doctor: Doctor, record: VmRecord, view: HostView | None, others: list[VmRecord],
                 expectation: Expectation) -> None:
        self._doctor = doctor
        self._expectation = expectation
        self._s = doctor.sources
        self._d = doctor.deadlines
        self.record = record
        self._view = view
        self._others = [r for r in others if r.vm_id != record.vm_id and r.holds_resources]
        self._vmm_view: VmmView | None = None
        self._console: list[str] | None = None
        self._address = IPv4Address(record.address.split("/")[0]) if record.address else None
        self._connection: DesktopConnection | None = None
        self._path = desktop_path(record.desktop_path)
        self._exits: list[str] = []  # desktop parts the console says failed or exited

    async def run(self) -> list[HopResult]:
        steps: dict[str, Callable[[HopResult], Awaitable[None]]] = {
            hops.VMM_SPAWN: self._vmm, hops.NET_TAP: self._tap, hops.GUEST_NETWORK: self._guest_network,
            hops.NET_ARP: self._arp, hops.DESKTOP_READY: self._desktop_ready, hops.NET_TCP: self._tcp,
            hops.WS_UPGRADE: self._upgrade, hops.RFB_BANNER: self._banner,
            hops.DESKTOP_COMPLETE: self._desktop_complete}
        results: list[HopResult] = []
        stopped = False
        try:
            for name in (name for name in _VM_HOPS if name in self._path.names):
                result = HopResult(name)
                results.append(result)
                if stopped:
                    result.status = SKIPPED
                    continue
                started = time.monotonic()
                try:
                    await steps[name](result)
                except (BrowserVMError, OSError) as exc:
                    result.found(Finding("probe.error", f"the doctor could not check this hop: {exc}"))
                result.seconds = time.monotonic() - started
                stopped = result.status == FAIL
        finally:
            if self._connection is not None:
                self._connection.close()
        return results

    # vmm.spawn

    async def _vmm(self, result: HopResult) -> None:
        record = self.record
        if not record.holds_resources or record.state == VmState.ENDED:
            failure = record.failure
            what = (f"the VM failed at {failure.hop}: {failure.reason}" if failure else
                    f"the VM is {record.state.value}{': ' + record.ended_reason if record.ended_reason else ''}")
            result.checked.append(f"record: state {record.state.value}, resources released")
            # Both logs as the failure recorded them: the directory they were in is gone.
            evidence = ([f"console: {line}" for line in failure.evidence]
                        + [f"vmm.log: {line}" for line in failure.vmm_log]) if failure else []
            if record.accel:
                evidence.append(f"accelerator: {record.accel} ({record.accel_reason or 'no reason recorded'})")
            result.found(Finding("vm.released", f"{what}; its VMM, TAP and disk were released", evidence))
            return
        if record.pid is None or record.pid_start_time is None:
            result.found(Finding("vm.not_started", f"the record (state {record.state.value}) names no VMM process"))
            return
        vmms = self._s.vmms
        alive = await bounded(lambda: vmms.alive(record), self._d.vmm, "checking the VMM process")
        result.checked.append(f"VMM PID {record.pid} (start time {record.pid_start_time}) alive, a VMM standing in "
                              f"{record.directory}")
        if not alive:
            result.found(Finding("vmm.dead", f"the VMM (PID {record.pid}) is gone: the guest is not running",
                                 await bounded(self._vmm_death_evidence, self._d.vmm, "reading the VMM's logs")))
            return
        try:
            view = await bounded(lambda: vmms.view(record), self._d.vmm, "reading the VMM's configuration")
        except (OSError, ValueError) as exc:
            result.found(Finding("vmm.config_unreadable", f"cannot read what the VMM uses: {exc}"))
            return
        self._vmm_view = view
        self._compare_config(view, result)

    def _vmm_death_evidence(self) -> list[str]:
        record = self.record
        assert record.pid is not None
        evidence = []
        stat = Path(f"/proc/{record.pid}/stat")
        if not stat.exists():
            evidence.append(f"no process {record.pid} (recorded start time {record.pid_start_time})")
        else:
            exe = process._link(record.pid, "exe")  # the same reading is_vmm_of made
            evidence.append(f"PID {record.pid} now runs {exe or '?'} (start time "
                            f"{process.start_time(record.pid)}, recorded {record.pid_start_time}): not this VM's VMM")
        directory = Path(record.directory)
        evidence += [f"vmm.log: {line}" for line in _tail(directory / "vmm.log", 5)]
        evidence += [f"console: {line}" for line in _tail(directory / "console.log", 8)]
        if record.failure is not None:
            evidence.append(f"recorded failure: {record.failure.hop}: {record.failure.reason}")
        return evidence

    def _compare_config(self, view: VmmView, result: HopResult) -> None:
        record = self.record
        result.checked.append(f"{view.source}: TAP {view.tap}, MAC {view.mac} (record: {record.tap}, {record.mac})")
        if view.tap != record.tap:
            result.found(Finding("tap.mismatch", f"the VMM uses TAP {view.tap}, the record says {record.tap}",
                                 [f"VMM ({view.source}): host_dev_name/ifname = {view.tap}",
                                  f"record: tap = {record.tap}"]))
        if view.iface_id is not None and view.iface_id != record.tap:
            result.found(Finding("tap.mismatch", f"the VMM's iface_id is {view.iface_id}, not the VM's TAP "
                                                 f"{record.tap}", [f"VMM ({view.source}): iface_id = {view.iface_id}"]))
        if (view.mac or "").lower() != record.mac.lower():
            result.found(Finding("mac.mismatch", f"the VMM gives the guest MAC {view.mac}, the record says "
                                                 f"{record.mac}",
                                 [f"VMM ({view.source}): mac = {view.mac}", f"record: mac = {record.mac}"]))
        try:
            ip = ip_config_from_cmdline(view.boot_args or "")
        except BootArgsError as exc:
            result.found(Finding("ip.mismatch", f"the guest's ip= cannot be read: {exc}"))
            return
        want = IPv4Interface(record.address) if record.address else None
        got = ip.interface if ip is not None else None
        gateway = ip.gateway if ip is not None else None
        result.checked.append(f"boot args ip=: {got} gw {gateway} (record: {want} gw {record.gateway})")
        if want is not None and (got != want or str(gateway) != record.gateway):
            result.found(Finding("ip.mismatch", f"the guest is told {got} gw {gateway}, the record holds {want} gw "
                                                f"{record.gateway}", [f"boot args: {view.boot_args}"]))

    # net.tap

    async def _tap(self, result: HopResult) -> None:
        record, view = self.record, self._view
        if view is None or not view.netns_exists:
            result.found(Finding("probe.error", "the VM network's namespace could not be read"))
            return
        if self._address is None:
            result.found(Finding("probe.error", "the VM's record holds no address to check its port against"))
            return
        port_properties(self._expectation, record, str(self._address), view, result)
        if record.tap in view.links:
            self._conflicts(view, result)

    def _conflicts(self, view: HostView, result: HopResult) -> None:
        record = self.record
        address = record.address.split("/")[0]
        result.checked.append(f"no other VM record, and no neighbour entry with another MAC, claims {address} or "
                              f"{record.mac}")
        for other in self._others:
            if other.address.split("/")[0] == address or other.mac.lower() == record.mac.lower():
                result.found(Finding("address.conflict", f"VM {other.vm_id} also holds {other.address} / {other.mac}",
                                     [f"record {other.vm_id}: {other.address} {other.mac}",
                                      f"record {record.vm_id}: {record.address} {record.mac}"]))
        bridge = view.links.get(record.bridge)
        for neighbour in view.neighbours:
            if (neighbour.address == address and neighbour.mac and bridge is not None
                    and neighbour.ifindex == bridge.index and neighbour.mac.lower() != record.mac.lower()
                    and neighbour.state not in ("failed", "incomplete")):
                result.found(Finding("neighbour.conflict", f"the host's neighbour table maps {address} to "
                                                           f"{neighbour.mac}, not to the VM's {record.mac}",
                                     [f"neighbour {address} lladdr {neighbour.mac} dev {record.bridge} "
                                      f"{neighbour.state}"]))

    # guest.network

    async def _read_console(self) -> list[str]:
        if self._console is None:
            path = Path(self.record.directory) / "console.log"
            self._console = await bounded(lambda: _console_lines(path), self._d.console, "reading the console")
        return self._console

    async def _guest_network(self, result: HopResult) -> None:
        record = self.record
        lines = await self._read_console()
        result.checked.append(f"console ({len(lines)} lines): the kernel's IP-Config or browservm-net's line")
        if not lines:
            result.found(Finding("console.missing", "the console log is empty or missing: the guest printed nothing"))
            return
        configured: GuestNetwork | None = None
        refusal: str | None = None
        net_line: str | None = None
        for line in lines:
            verdict = guest_network_line(line)
            marker = parse_marker(line)
            if marker is not None and marker[0] == "net":
                net_line = line.strip()
            if isinstance(verdict, GuestNetwork):
                configured = verdict
                break
            if isinstance(verdict, str) and refusal is None:
                refusal = verdict
        if configured is not None:
            marker = parse_marker(configured.line)
            address = marker[1].get("address") if marker else None
            result.checked.append(f"configured by the {configured.by}: {configured.line.strip()}")
            if address and record.address and address != record.address:
                result.found(Finding("ip.mismatch", f"the guest configured {address}, the record holds "
                                                     f"{record.address}", [configured.line.strip()]))
            return
        ignored = next((line.strip() for line in lines if IP_IGNORED in line and "ip=" in line), None)
        evidence = [line for line in (ignored, net_line) if line]
        disabled = refusal is not None and "disabled" in refusal
        if ignored is not None:
            kernel, image = await self._guest_images()
            if kernel is not None and kernel.ip_pnp is not None:
                evidence.append(f"kernel inspect {kernel.path}: CONFIG_IP_PNP={kernel.ip_pnp}")
            if image is not None:
                evidence.append(f"image {image.path}: {image.detail}")
            if image is not None and image.has_configurator is False:
                second = "the image has no network configurator"
            elif disabled:
                second = f"the image's network configurator was disabled ({DISABLE_WORD})"
            elif refusal is not None:
                second = refusal
            else:
                second = "no network configurator ran"
            result.found(Finding("kernel.no_ip_pnp", f"the kernel ignored ip= (no CONFIG_IP_PNP) and {second}",
                                 evidence))
            return
        if refusal is not None:
            code = "guest.configurator_disabled" if disabled else "guest.configurator_failed"
            result.found(Finding(code, refusal, evidence))
            return
        booting = record.state in (VmState.CREATING, VmState.BOOTING)
        result.found(Finding("guest.network_pending", "the console shows no network configuration yet"
                             + (" (the VM is still booting)" if booting else ""), lines[-5:]))

    async def _guest_images(self) -> tuple[KernelFacts | None, ImageFacts | None]:
        """The kernel and image the VMM actually runs, to say why nothing applied ip=."""
        view = self._vmm_view
        kernel_path = Path(view.kernel) if view is not None and view.kernel else None
        rootfs_path = Path(view.rootfs) if view is not None and view.rootfs else None
        kernel, image = await asyncio.gather(self._doctor.kernel_facts(kernel_path),
                                             self._doctor.image_facts(rootfs_path))
        return kernel, image

    # net.arp

    async def _arp(self, result: HopResult) -> None:
        record = self.record
        assert self._address is not None
        result.checked.append(f"ARP who-has {self._address} on {record.bridge}, answered from {record.mac}")
        try:
            mac = await arp_probe(self._s.netns, record.bridge, IPv4Address(record.gateway), self._address,
                                  self._d.arp)
        except ProbeFailed as exc:
            result.found(Finding("arp.no_reply", exc.reason, self._ip_hints()))
            return
        result.checked.append(f"answered from {mac}")
        if mac.lower() != record.mac.lower():
            result.found(Finding("arp.wrong_mac", f"{self._address} answered from {mac}, not from the VM's MAC "
                                                  f"{record.mac}", [f"ARP reply from {mac}", f"record: {record.mac}"]))

    def _ip_hints(self) -> list[str]:
        lines = self._console or []
        return [line.strip() for line in lines if "browservm-net:" in line or "IP-Config" in line][-3:]

    # desktop.ready, desktop.complete

    async def _desktop_ready(self, result: HopResult) -> None:
        await self._desktop_marker(result, self._path.listener, "desktop.not_ready")

    async def _desktop_complete(self, result: HopResult) -> None:
        await self._desktop_marker(result, "desktop", "desktop.incomplete", fatal=False)

    async def _desktop_marker(self, result: HopResult, service: str, code: str, fatal: bool = True) -> None:
        lines = await self._read_console()
        result.checked.append(f"console: browservm-ready service={service} state=ready")
        ready = whole = None
        for line in lines:
            marker = parse_marker(line)
            if marker is None or marker[0] != "ready":
                continue
            fields = marker[1]
            if fields.get("state") in ("failed", "exited"):
                self._exits.append(line.strip())
            elif fields.get("service") == service and fields.get("state") == "ready":
                ready = line.strip()
            elif fields.get("service") == "desktop" and fields.get("state") == "ready":
                whole = line.strip()
        if ready is not None:
            result.checked.append(ready)
        elif whole is not None:
            result.found(Finding(code, f"the desktop reported ready without {service}: the image's "
                                       "/etc/browservm/desktop.json leaves it out", [whole, *self._exits[-2:]],
                                 fatal=fatal))
        else:
            result.found(Finding(code, f"the desktop supervisor never reported {service} ready", self._exits[-3:],
                                 fatal=fatal))
        if self._exits:
            # A part that died after it was ready: the live hops decide; this is their evidence.
            result.found(Finding("desktop.part_failed", f"the console says a desktop part stopped: {self._exits[-1]}",
                                 self._exits[-3:], fatal=False))

    # net.tcp, ws.upgrade (websockify's path), rfb.banner: the readiness probes' one implementation

    async def _tcp(self, result: HopResult) -> None:
        assert self._address is not None
        port = self._path.port
        result.checked.append(f"TCP connect to {self._address}:{port} ({self._path.listener}) from the VM namespace")
        try:
            self._connection = await DesktopConnection.open(self._s.netns, self._address, port, self._d.tcp,
                                                            self._path.websocket)
        except ProbeFailed as exc:
            result.found(self._tcp_cause(exc.reason))
            return
        result.checked.append("connected")

    def _tcp_cause(self, reason: str) -> Finding:
        evidence = [f"connect: {reason}", *self._exits[-2:]]
        port, listener = self._path.port, self._path.listener
        if "refused" in reason:
            return Finding("desktop.port_closed", f"{self._address}:{port} refuses connections: nothing "
                                                  f"listens there ({listener} is not running)", evidence)
        if "unreachable" in reason.lower() or "no route" in reason.lower():
            return Finding("tcp.unreachable", f"no route to {self._address}: {reason}", evidence)
        plan = self._s.plan
        drops = foreign_drops(self._view.ruleset if self._view else None, plan.subnet, plan.bridges, port)
        if drops:
            return Finding("firewall.foreign_drop", f"connections to :{port} are dropped by a rule outside "
                                                    "browservm's tables", [*drops, *evidence])
        return Finding("tcp.timeout", f"{self._address}:{port} does not answer: {reason}", evidence)

    async def _upgrade(self, result: HopResult) -> None:
        assert self._connection is not None
        result.checked.append(f"WebSocket upgrade on :{self._path.port} answered with 101")
        try:
            async with asyncio.timeout(self._d.websocket):
                await self._connection.upgrade()
        except TimeoutError:
            result.found(Finding("ws.timeout", f"no answer to the upgrade within {self._d.websocket:g} s"))
        except ProbeFailed as exc:
            result.found(Finding("ws.refused", exc.reason, [f"upgrade: {exc.reason}"]))

    async def _banner(self, result: HopResult) -> None:
        assert self._connection is not None
        result.checked.append("RFB 003.008 through the WebSocket" if self._path.websocket else
                              f"RFB 003.008 from {self._path.listener}")
        try:
            async with asyncio.timeout(self._d.rfb):
                banner = await self._connection.banner()
        except TimeoutError:
            result.found(Finding("rfb.timeout", f"the VNC server said nothing within {self._d.rfb:g} s",
                                 self._exits[-2:]))
            return
        except ProbeFailed as exc:
            closed = "closed" in exc.reason
            result.found(Finding("vnc.unreachable" if closed else "rfb.bad_banner", exc.reason,
                                 [f"banner: {exc.reason}", *self._exits[-2:]]))
            return
        result.checked.append(f"banner {banner!r}")


def _tail(path: Path, count: int) -> list[str]:
    try:
        with path.open("rb") as stream:
            stream.seek(max(0, stream.seek(0, os.SEEK_END) - 64 * 1024))
            data = stream.read()
    except OSError:
        return []
    return [line.decode(errors="replace").rstrip("\r") for line in data.splitlines()[-count:]]


def _console_lines(path: Path) -> list[str]:
    """The console's first and last MiB as lines: the guest writes this file, so it is bounded."""
    try:
        with path.open("rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            stream.seek(0)
            if size <= CONSOLE_HEAD + CONSOLE_TAIL:
                data = stream.read()
            else:
                head = stream.read(CONSOLE_HEAD)
                stream.seek(size - CONSOLE_TAIL)
                data = head + b"\n" + stream.read()
    except FileNotFoundError:
        return []
    return [line.decode(errors="replace").rstrip("\r") for line in data.splitlines()]
