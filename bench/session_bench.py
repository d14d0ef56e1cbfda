"""A desktop session through the controller: POST /v1/vms -> browser on screen, cold boot vs restore vs pool.

Run as root, holding the VM lock: flock /tmp/browservm-vm.lock .venv/bin/python bench/session_bench.py [--runs 5]

The `full` image (Chromium), QEMU (TCG on these machines), 1 vCPU and 1 GiB per VM, and the real
`browservm serve` as a subprocess, its VM network in a namespace this script creates and deletes. The
kinds are grouped, one serve each, in this order, `--runs` sessions of each (one VM at a time,
deleted before the next):

  cold     serve                     every VM boots
  restore  serve --snapshots         the snapshot is made in the background at the first create; an
                                     unmeasured create starts it (and is deleted at once), and the runs
                                     begin once GET /metrics shows browservm_snapshot_age_seconds > 0
  pool     serve --pool 1            the pool restores from the same snapshot (same inputs, same key);
                                     each claim is of a VM that has waited in the full pool for
                                     --pool-idle seconds (default 10), as pooled VMs do between requests
  pool-ws  serve --pool 1            the same, with --desktop-path websockify: the proxy reaches the
           --desktop-path websockify  guest through its websockify, as before the rfb path

With --profile, each cold, restore and pool session is followed by one of a user with a persistent browser
profile (`profile: persistent`, issue 22), in the same serve: its ready includes the profile's load
(profile.load: the keeper in the guest opens the sealed profile and starts Chromium again with it; into a
pooled VM, at its claim), and its DELETE the profile's save (Chromium stopped, packed, sealed in the guest,
kept by the host), timed as `end`. The profile is what Chromium itself keeps of its start page (a few
hundred KiB sealed), saved and loaded again at each session; printed beside the same kind without.

A session: POST /v1/vms -> its `ready` event (SSE; `ready` comes after `desktop.complete`, which is
checked) -> POST /v1/vms/{id}/viewer -> the proxy's WebSocket with that token -> RFB 3.8 with no
authentication (the proxy authenticates to the VM for us) -> SetPixelFormat (32 bpp true colour),
SetEncodings [raw], a full FramebufferUpdateRequest, then incremental ones, until the frame shows the
browser. Three times per session, from the POST:
  ready      the record says ready
  viewer     viewer connected: the first FramebufferUpdate's header has arrived
  screen     browser on screen: the first complete frame the test below accepts

"Browser on screen" is judged by the pixels, as browservm/vm/screen.py judges it before it lets a
snapshot be made (at least half the screen not the bare desktop's black, at least 16 colours; the
coverage and colours are printed per run).

Also per session: the serve process's CPU time (utime + stime of all its threads, /proc/<pid>/stat)
from the POST to browser on screen, and its VMM's VmRSS at that moment; for the pool, each pooled VM's
QEMU VmRSS just before it is claimed (memory per pooled VM), and serve's CPU from the POST until the
pool is full again: the claim's refill (a restore, in serve's background) is part of what a pooled
session costs.

Targets from issue 12 (software emulation here): pool claim -> viewer connected <= 200 ms; restore ->
browser on screen <= 5 s; cold unchanged or better (the issue's baseline: 45-56 s to rfb.banner,
about 20 s more to Chromium). Printed beside the medians with the ratios restore/cold and pool/cold;
nothing asserts a time. On 2 cores the whole run with --runs 5 took 512 s (a cold session about 47 s with
its delete, the snapshot about 65 s, a restore about 7 s with its settle, a pooled one its idle time plus
about 5 s); a minute more when the golden image is built first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from browservm import rfb
from browservm.config import Settings, load_settings
from browservm.controller import open_controller, resolve_images
from browservm.hostnet.netns import NetworkNamespace
from browservm.progress import Progress
from browservm.vm.screen import Screen, watch

PROFILE_USER = "bench-profile"  # the sessions with a persistent profile: one user, its profile carried on
POOL_USER = "browservm-pool"  # browservm.vm.pool.POOL_USER: whose VMs the pooled ones are
BOOT_S = 300.0  # POST -> ready, at most (a cold full boot takes over a minute under TCG)
SCREEN_S = 60.0  # ready -> browser on screen, at most
SNAPSHOT_S = 400.0  # the snapshot's cold boot and save, at most
SETTLE_S = 5.0  # after a delete: the previous VM's teardown is off the CPUs
POOL_IDLE_S = 10.0  # a pooled VM's wait in the full pool before its claim (the refill restore off the CPUs)
TICK = os.sysconf("SC_CLK_TCK")

# --- a viewer: RFB through the controller's proxy ---------------------------------------------------


async def watch_screen(url: str, deadline_s: float) -> Screen:
    """Connect as a viewer, then read frames until one shows the browser (or raise TimeoutError)."""
    async with asyncio.timeout(deadline_s), \
            connect(url, subprotocols=[Subprotocol("binary")], compression=None, proxy=None,
                    max_size=2**22, open_timeout=deadline_s) as viewer:
        reader = rfb.MessageReader(lambda: viewer.recv(decode=False))
        if await reader.read(12) != rfb.VERSION:
            raise RuntimeError("the proxy does not speak RFB 3.8")
        await viewer.send(rfb.VERSION)
        if await reader.read(2) != bytes([1, rfb.NO_AUTH]):
            raise RuntimeError("the proxy offers more than 'no authentication'")
        await viewer.send(bytes([rfb.NO_AUTH]))
        if await reader.read(4) != struct.pack(">I", 0):
            raise RuntimeError("the proxy refused the security handshake")
        return await watch(reader, viewer.send)


# --- serve as a subprocess ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc (the fields after the command name)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class Serve:
    """`browservm serve` in a process of its own; its output is kept for when something fails."""

    def __init__(self, argv: list[str], state_dir: Path, port: int) -> None:
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        listening = threading.Event()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.append(line.rstrip())
                if line.startswith("serve: listening"):
                    listening.set()
        threading.Thread(target=read, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        if not listening.wait(120):
            self.stop()
            raise RuntimeError("serve did not start:\n" + "\n".join(self.lines[-40:]))
        key = (state_dir / "api.key").read_text().strip()
        self.api = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                                timeout=httpx.Timeout(BOOT_S), trust_env=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def vms(self) -> list[dict[str, Any]]:
        answer = self.api.get("/v1/vms")
        answer.raise_for_status()
        vms: list[dict[str, Any]] = answer.json()
        return vms

    def delete(self, vm_id: str) -> None:
        self.api.delete(f"/v1/vms/{vm_id}").raise_for_status()

    def snapshot_age(self) -> float:
        for line in self.api.get("/metrics").text.splitlines():
            if line.startswith("browservm_snapshot_age_seconds"):
                return float(line.split()[-1])
        return 0.0

    def stop(self) -> None:
        """SIGTERM (serve runs with --stop-vms-on-exit, so it destroys what is left), then wait."""
        if hasattr(self, "api"):
            self.api.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def serving(argv: list[str], state_dir: Path) -> Iterator[Serve]:
    port = _free_port()
    serve = Serve([*argv, "--listen", f"127.0.0.1:{port}"], state_dir, port)
    try:
        yield serve
    finally:
        with contextlib.suppress(httpx.HTTPError):
            for vm in serve.vms():  # the pool's too: serve would destroy them, this is sooner
                serve.delete(vm["vm_id"])
        serve.stop()


# --- one session ----------------------------------------------------------------------------------------


@dataclass
class Session:
    started_from: str
    ready_s: float
    viewer_s: float
    first_frame_s: float
    screen_s: float
    cpu_s: float  # serve's CPU, POST -> browser on screen
    rss: int  # the VM's QEMU at browser on screen
    covered: float
    colours: int
    banner_s: float  # the record's rfb.banner stage
    pooled_rss: int = 0  # pool: its QEMU just before the claim
    refill_cpu_s: float = 0.0  # pool: serve's CPU from the POST until the pool is full again (claim + refill)
    end_s: float = 0.0  # its DELETE (with a persistent profile: the profile's save)
    sealed: int = 0  # with a persistent profile: the sealed profile's bytes after the DELETE
    notes: list[str] = field(default_factory=list)


def ready_record(serve: Serve, vm: dict[str, Any]) -> dict[str, Any]:
    """The record once ready, following its event stream (SSE: past stages first, then each new one)."""
    if vm["state"] != "ready":
        with serve.api.stream("GET", f"/v1/vms/{vm['vm_id']}/events") as events:
            for line in events.iter_lines():
                if line.startswith("event: ") and line.removeprefix("event: ") in ("ready", "failed", "ended",
                                                                                    "destroyed"):
                    break
    record: dict[str, Any] = serve.api.get(f"/v1/vms/{vm['vm_id']}").json()
    if record["state"] != "ready" or "desktop.complete" not in record["stages"]:
        raise RuntimeError(f"{vm['vm_id']} did not come up: {record.get('failure') or record['state']}")
    return record


def session(serve: Serve, profile: bool = False) -> tuple[Session, str]:
    cpu_before = cpu_seconds(serve.pid)
    started = time.perf_counter()
    body = {"user": PROFILE_USER, "profile": "persistent"} if profile else {"user": "bench"}
    answer = serve.api.post("/v1/vms", json=body)
    if answer.status_code != 202:
        raise RuntimeError(f"POST /v1/vms answered {answer.status_code}: {answer.text}")
    record = ready_record(serve, answer.json())
    ready_at = time.perf_counter()
    vm_id = record["vm_id"]
    viewer = serve.api.post(f"/v1/vms/{vm_id}/viewer")
    viewer.raise_for_status()
    url = f"{serve.ws_url}/v1/vms/{vm_id}/vnc?token={viewer.json()['token']}"
    screen = asyncio.run(watch_screen(url, SCREEN_S))
    cpu = cpu_seconds(serve.pid) - cpu_before
    return Session(started_from=record["started_from"], ready_s=ready_at - started,
                   viewer_s=screen.viewer_at - started, first_frame_s=screen.first_frame_at - started,
                   screen_s=screen.screen_at - started, cpu_s=cpu, rss=rss_bytes(int(record["pid"])),
                   covered=screen.covered, colours=screen.colours,
                   banner_s=float(record["stages"].get("rfb.banner", 0.0))), vm_id


def end(serve: Serve, one: Session, vm_id: str, profile: bool) -> None:
    """DELETE the session's VM, timed (with a profile: its save), and the sealed profile's size after it."""
    began = time.perf_counter()
    serve.delete(vm_id)
    one.end_s = time.perf_counter() - began
    if profile:
        one.sealed = int(serve.api.get(f"/v1/users/{PROFILE_USER}/profile").json()["size_bytes"])


def _pooled(serve: Serve) -> list[dict[str, Any]]:
    return [vm for vm in serve.vms() if vm["user"] == POOL_USER]


def wait_pool_full(serve: Serve, size: int, deadline_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        pooled = _pooled(serve)
        if len(pooled) == size and all(vm["state"] == "ready" for vm in pooled):
            return pooled
        time.sleep(2.0)  # seldom: each look is serve CPU, counted in the refill's
    raise TimeoutError(f"the pool was not full within {deadline_s:g} s: {_pooled(serve)}")


def wait_snapshot(serve: Serve, progress: Progress) -> None:
    """Make sure a snapshot exists: the first create starts one in the background (its VM is deleted at
    once, so only the snapshot's own cold boot runs), then wait for the metric to say it is there."""
    if serve.snapshot_age() > 0:
        return
    answer = serve.api.post("/v1/vms", json={"user": "bench"})
    answer.raise_for_status()
    serve.delete(answer.json()["vm_id"])
    progress.stage("snapshot", "being made in the background (a cold boot and a save)")
    deadline = time.monotonic() + SNAPSHOT_S
    while serve.snapshot_age() <= 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no snapshot within {SNAPSHOT_S:g} s:\n" + "\n".join(serve.lines[-30:]))
        time.sleep(1.0)
    while serve.vms():  # the VM the snapshot was made of is destroyed just after the snapshot is published
        if time.monotonic() > deadline:
            raise TimeoutError(f"VMs left after the snapshot: {serve.vms()}")
        time.sleep(1.0)


# --- the run -------------------------------------------------------------------------------------------


def _qemu_under(state_dir: Path) -> list[int]:
    """QEMU processes of this run: a VMM's working directory is its VM's directory, under our state dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(entry / "exe")).name.startswith("qemu-system") and \
                    Path(os.readlink(entry / "cwd")).is_relative_to(state_dir):
                found.append(int(entry.name))
    return found


def teardown(settings: Settings, state_dir: Path, netns_name: str) -> None:
    """After every serve has stopped: whatever is left of VMs and network goes, even after a failure."""
    with open_controller(settings) as controller:
        for record in asyncio.run(controller.manager.all()):
            with contextlib.suppress(Exception):
                asyncio.run(controller.manager.destroy(record.vm_id))
        controller.network.down(force=True)
    for pid in _qemu_under(state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    namespace = NetworkNamespace(netns_name)
    if namespace.exists():
        namespace.delete()


def _line(s: Session) -> str:
    return (f"{s.started_from}: ready {s.ready_s:.2f} s, viewer {s.viewer_s:.3f} s, screen {s.screen_s:.2f} s "
            f"({s.covered:.0%} covered, {s.colours} colours), serve CPU {s.cpu_s:.2f} s, "
            f"QEMU RSS {s.rss / 2**20:.0f} MiB" + (f", pooled RSS {s.pooled_rss / 2**20:.0f} MiB, refill CPU "
                                                    f"{s.refill_cpu_s:.2f} s" if s.pooled_rss else ""))


def measure(work: Path, runs: int, pool_idle: float, profiles: bool) -> dict[str, list[Session]]:
    progress = Progress()
    state_dir = work / "state"
    netns_name = f"bvsess-{os.getpid()}"
    settings = load_settings(netns=netns_name, state_dir=state_dir, vmm="qemu", image_profile="full")
    images = resolve_images(settings, progress)  # built (or found cached) before serve starts, not inside it
    base = [sys.executable, "-m", "browservm", "serve", "--netns", netns_name, "--state-dir", str(state_dir),
            "--vmm", "qemu", "--kernel", str(images.kernel), "--rootfs", str(images.rootfs), "--stop-vms-on-exit"]
    results: dict[str, list[Session]] = {}
    variants = (False, True) if profiles else (False,)

    def record(kind: str, n: int, one: Session) -> None:
        results.setdefault(kind, []).append(one)
        progress.stage(f"{kind} {n + 1}/{runs}", _line(one))

    try:
        with serving(base, state_dir) as serve:
            for n in range(runs):
                for profile in variants:
                    one, vm_id = session(serve, profile)
                    end(serve, one, vm_id, profile)
                    record("cold+profile" if profile else "cold", n, one)
                    time.sleep(SETTLE_S)
        with serving([*base, "--snapshots"], state_dir) as serve:
            wait_snapshot(serve, progress)
            time.sleep(SETTLE_S)
            for n in range(runs):
                for profile in variants:
                    one, vm_id = session(serve, profile)
                    end(serve, one, vm_id, profile)
                    record("restore+profile" if profile else "restore", n, one)
                    time.sleep(SETTLE_S)
        # The pool twice: the desktop path of today (RFB straight to the VNC server), then the seed's
        # (through the guest's websockify), which is what viewer connected cost before.
        for kind, path in (("pool", "rfb"), ("pool-ws", "websockify")):
            with serving([*base, "--pool", "1", "--desktop-path", path], state_dir) as serve:
                for n in range(runs):
                    for profile in variants if kind == "pool" else (False,):
                        pooled = wait_pool_full(serve, 1, BOOT_S)
                        time.sleep(pool_idle)
                        pooled_rss = rss_bytes(int(pooled[0]["pid"]))
                        cpu_at_post = cpu_seconds(serve.pid)
                        one, vm_id = session(serve, profile)
                        wait_pool_full(serve, 1, BOOT_S)  # the claim's refill: a restore, in serve's background
                        one.pooled_rss, one.refill_cpu_s = pooled_rss, cpu_seconds(serve.pid) - cpu_at_post
                        end(serve, one, vm_id, profile)
                        record(f"{kind}+profile" if profile else kind, n, one)
    finally:
        teardown(settings, state_dir, netns_name)
    return results


# --- the table ------------------------------------------------------------------------------------------


def _median(sessions: list[Session], attribute: str) -> float:
    return float(statistics.median(getattr(s, attribute) for s in sessions))


def _span(sessions: list[Session], attribute: str, unit: float = 1.0, digits: int = 2) -> str:
    values = [getattr(s, attribute) / unit for s in sessions]
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def report(results: dict[str, list[Session]], runs: int, pool_idle: float) -> None:
    expected = {"cold": "cold", "restore": "restored", "pool": "pooled", "pool-ws": "pooled"}
    expected |= {f"{kind}+profile": started for kind, started in expected.items()}
    print(f"\nPOST /v1/vms -> browser on screen through the controller, full image, QEMU/TCG, 1 vCPU / 1 GiB; "
          f"{runs} sessions of each, grouped (cold, restore, pool, pool-ws; each pooled VM idle {pool_idle:g} s in "
          f"the full pool before its claim); median (min-max), seconds from the POST")
    print(f"  {'':<15} {'ready':<22} {'viewer connected':<22} {'browser on screen':<22} "
          f"{'serve CPU s/session':<20} {'QEMU RSS MiB':<16} started as")
    for kind, sessions in results.items():
        kinds = Counter(s.started_from for s in sessions)
        started = ", ".join(f"{count} {name}" for name, count in kinds.items())
        odd = "" if set(kinds) == {expected[kind]} else "  <- not all " + expected[kind]
        print(f"  {kind:<15} {_span(sessions, 'ready_s'):<22} {_span(sessions, 'viewer_s', digits=3):<22} "
              f"{_span(sessions, 'screen_s'):<22} {_span(sessions, 'cpu_s'):<20} "
              f"{_span(sessions, 'rss', 2**20, 0):<16} {started}{odd}")
    cold, restore, pool = results["cold"], results["restore"], results["pool"]
    print(f"  first frame complete (raw, 1280x800 x 4 bytes = 4.1 MB through the proxy): "
          f"cold {_span(cold, 'first_frame_s')}, restore {_span(restore, 'first_frame_s')}, "
          f"pool {_span(pool, 'first_frame_s', digits=3)}, "
          f"pool-ws {_span(results['pool-ws'], 'first_frame_s', digits=3)}")
    gaps = {kind: statistics.median(s.screen_s - s.ready_s for s in sessions) for kind, sessions in results.items()}
    print("  ready (desktop.complete passed) -> browser on screen: " + ", ".join(f"{kind} {gap:.2f} s"
                                                                             for kind, gap in gaps.items()))
    print(f"  memory per pooled VM (its QEMU's VmRSS while pooled, before the claim): "
          f"{_span(pool, 'pooled_rss', 2**20, 0)} MiB; serve CPU per pooled session with its refill (POST until "
          f"the pool is full again): {_span(pool, 'refill_cpu_s')} s")
    cold_screen = _median(cold, "screen_s")
    print("\n  ratios to cold (browser on screen, medians): "
          f"restore/cold {_median(restore, 'screen_s') / cold_screen:.3f}, "
          f"pool/cold {_median(pool, 'screen_s') / cold_screen:.4f}; "
          f"serve CPU restore/cold {_median(restore, 'cpu_s') / _median(cold, 'cpu_s'):.2f}, "
          f"pool/cold {_median(pool, 'cpu_s') / _median(cold, 'cpu_s'):.2f}")
    pool_viewer_ms = _median(pool, "viewer_s") * 1000
    print(f"  pool claim -> viewer connected by desktop path: rfb {pool_viewer_ms:.0f} ms, websockify "
          f"{_median(results['pool-ws'], 'viewer_s') * 1000:.0f} ms "
          f"(rfb/websockify {_median(pool, 'viewer_s') / _median(results['pool-ws'], 'viewer_s'):.2f})")
    if "cold+profile" in results:
        print("\n  with a persistent browser profile against the same without (issue 22), medians:")
        for kind in ("cold", "restore", "pool"):
            plain, kept = results[kind], results[f"{kind}+profile"]
            before, after = _median(plain, "screen_s"), _median(kept, "screen_s")
            print(f"    {kind:<8} browser on screen {before:.2f} -> {after:.2f} s ({after / before:.2f}x, "
                  f"{after - before:+.2f} s); end (DELETE) "
                  f"{_median(plain, 'end_s'):.2f} -> {_median(kept, 'end_s'):.2f} s (the save); "
                  f"sealed profile {_span(kept, 'sealed', 1024, 0)} KiB")
    restore_screen = _median(restore, "screen_s")
    print("  against issue 12's targets:")
    print(f"    pool claim -> viewer connected  {pool_viewer_ms:8.0f} ms  target <= 200 ms   "
          f"{pool_viewer_ms / 200:.2f}x the target  {'met' if pool_viewer_ms <= 200 else 'missed'}")
    print(f"    restore -> browser on screen    {restore_screen:8.2f} s   target <= 5 s      "
          f"{restore_screen / 5:.2f}x the target  {'met' if restore_screen <= 5 else 'missed'}")
    print(f"    cold -> browser on screen       {cold_screen:8.2f} s   target: unchanged or better than the issue's "
          f"45-56 s to rfb.banner + ~20 s to Chromium; here rfb.banner at {_median(cold, 'banner_s'):.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="sessions of each kind (default 5)")
    parser.add_argument("--pool-idle", type=float, default=POOL_IDLE_S,
                        help=f"seconds a pooled VM waits in the full pool before its claim (default {POOL_IDLE_S:g})")
    parser.add_argument("--profile", action="store_true",
                        help="also each cold, restore and pool session with a persistent browser profile")
    args = parser.parse_args()
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bvbench-session-") as scratch:
        results = measure(Path(scratch), args.runs, args.pool_idle, args.profile)
    report(results, args.runs, args.pool_idle)
    print(f"\n  whole run: {time.monotonic() - began:.0f} s")


if __name__ == "__main__":
    main()
