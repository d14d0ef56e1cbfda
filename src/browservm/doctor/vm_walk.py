"""One VM's hops in order, from its record, its console and live probes (vm/hops.py):

    vmm.spawn  the VMM is alive (PID and start time) and uses the record's TAP, MAC and ip=
    net.tap    every property `vm create` set on the TAP, as hostnet/expected.py describes it
               (doctor/props.py); no other record or neighbour entry claims the VM's address or MAC
    guest.network  the console's IP-Config or browservm-net line (which, and what it set)
    net.arp    ARP on the bridge answered from the VM's MAC
    desktop.ready  the desktop supervisor's marker for the VM's desktop path's listener
    net.tcp  ws.upgrade  rfb.banner   through the readiness probes (vm/readiness.py); ws.upgrade
               only on the websockify path (vm/desktop_path.py)
    desktop.complete  the supervisor's last marker

The console is read once, as ConsoleLog reads it (its first and last MiB, lines bounded), and its
markers as readiness reads them (guest/markers.py). The walk stops at the first failing hop; later ones
are `skipped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

from browservm import rfb
from browservm.doctor.deadlines import Deadlines, bounded
from browservm.doctor.host_boot import BootChecks
from browservm.doctor.host_network import HostState
from browservm.doctor.hostview import HostView, foreign_drops
from browservm.doctor.images import ImageFacts, KernelFacts
from browservm.doctor.props import port_properties
from browservm.doctor.report import FAIL, SKIPPED, Finding, HopResult
from browservm.doctor.sources import Sources
from browservm.doctor.vmmview import VmmView
from browservm.errors import BrowserVMError, ProbeFailed
from browservm.guest.bootargs import BootArgsError, ip_config_from_cmdline
from browservm.guest.markers import WHOLE_DESKTOP, parse_marker, parse_ready
from browservm.guest.netconfig import DISABLE_WORD
from browservm.vm import hops
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import desktop_path
from browservm.vm.readiness import IP_IGNORED, DesktopConnection, GuestNetwork, arp_probe, guest_network_line
from browservm.vm.records import VmRecord
from browservm.vm.state import VmState
from browservm.vmdir import VmDirectory
from browservm.vmm import process

_VM_HOPS = (hops.VMM_SPAWN, hops.NET_TAP, hops.GUEST_NETWORK, hops.NET_ARP, hops.DESKTOP_READY, hops.NET_TCP,
            hops.WS_UPGRADE, hops.RFB_BANNER, hops.DESKTOP_COMPLETE)
_LOG_END = 64 * 1024  # bytes of a log's end read for its last lines


class VmWalk:
    """One VM's hops in order; stops at the first failure."""

    def __init__(self, sources: Sources, deadlines: Deadlines, boot: BootChecks, *, record: VmRecord,
                 host: HostState, others: list[VmRecord]) -> None:
        """`host`: the host network as the doctor read it for this run; `others`: every VM's record."""
        self._boot = boot
        self._expectation = host.expectation
        self._s = sources
        self._d = deadlines
        self.record = record
        self._view = host.view
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
        files = VmDirectory(Path(record.directory))
        evidence += [f"vmm.log: {line}" for line in _last_lines(files.vmm_log, 5)]
        evidence += [f"console: {line}" for line in _last_lines(files.console_log, 8)]
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
            console = ConsoleLog(VmDirectory(Path(self.record.directory)).console_log)
            # Its start (the boot, with the markers) and its latest output: the guest writes this file.
            self._console = await bounded(console.ends, self._d.console, "reading the console")
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
        kernel, image = await asyncio.gather(self._boot.kernel_facts(kernel_path),
                                             self._boot.image_facts(rootfs_path))
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
        await self._desktop_marker(result, self._path.listeners, "desktop.not_ready")

    async def _desktop_complete(self, result: HopResult) -> None:
        await self._desktop_marker(result, (WHOLE_DESKTOP,), "desktop.incomplete", fatal=False)

    async def _desktop_marker(self, result: HopResult, services: tuple[str, ...], code: str,
                              fatal: bool = True) -> None:
        """The console's marker that one of `services` is ready (an image runs one of them), or why not."""
        service = " or ".join(services)
        lines = await self._read_console()
        result.checked.append(f"console: browservm-ready service={service} state=ready")
        ready = whole = None
        for line in lines:
            marker = parse_ready(line)
            if marker is None:
                continue
            if marker.stopped:
                self._exits.append(line.strip())
            elif any(marker.says_ready(one) for one in services):
                ready = line.strip()
            elif marker.says_ready(WHOLE_DESKTOP):
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
                                                            websocket=self._path.websocket)
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
        versions = " or ".join(f"{major}.{minor}" for major, minor in sorted(rfb.SERVER_VERSIONS))
        result.checked.append(f"an RFB {versions} banner " + ("through the WebSocket" if self._path.websocket else
                                                               f"from {self._path.listener}"))
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


def _last_lines(path: Path, count: int) -> list[str]:
    """The last `count` lines of a log in the VM's directory, read as a console is (bounded); none when
    it cannot be read: it is evidence, and the walk goes on without it."""
    with contextlib.suppress(OSError):
        return ConsoleLog(path).ends(0, _LOG_END)[-count:]
    return []
