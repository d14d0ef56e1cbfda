"""Login timings for the `sample` provider: what the controller and the agent add to what the tool itself takes.

Run as root: .venv/bin/python bench/login_bench.py [--runs 5] [--warmup 1]

One VM (the `oauth` image, 1 vCPU and 2 GiB as a login's VM, QEMU/TCG on these machines) is booted
once through a real `browservm serve` in a network namespace this script creates and deletes; the
test authorization server (tests/support/oauth_server.py, authlib) listens on its gateway. Runs of the
two kinds alternate in that one VM, after `--warmup` unmeasured runs of each:

  controller+agent  POST /v1/logins {provider, vm_id, keep_vm} -> the `waiting-for-user` event on the
                    login's event stream (SSE), and the approval -> the `captured` event. Each run has a
                    provider of its own (bench-N, the sample tool with its own credentials file), because
                    a VM that is reused still holds the files an earlier login wrote.
  tool alone        the same sample tool in the same VM, on the same desktop, against the same server,
                    with neither the controller nor the agent in the path: no exec hook into the guest
                    exists but the agent, so the agent only launches a small wrapper (WRAPPER below) and
                    is not asked anything until the run is over. The wrapper's clock starts just before
                    it runs the tool; `$BROWSER` is a two-line script that notes the time the tool calls
                    it and then opens the page in the desktop's Chromium the way the agent's opener does
                    (DevTools), without telling the agent. Open: tool start -> its browser called (the
                    guest's clock). Approval -> written: the wrapper watches the credentials file with
                    inotify, as the agent does, and sends one byte on a connection it opened beforehand
                    to a listener of this script on the gateway the moment the file is complete; the
                    host's clock stamps its arrival.

The approval is the same in both: the server holds its answer to the consent page's request until this
script releases it (the release is the instant of approval), at the earliest READ_S after the request
arrived (a person reads the page first; Chromium has finished opening the tab by then), then redirects
Chromium to the tool's loopback listener. So both intervals of a pair contain the same browser work
(Chromium following the redirect) and the same tool work (the code exchange, the file); what the first
adds is the terminal window, the runner, the opener, the agent, its polling by the controller, the
handover, the vault and the record. Target: <= 100 ms added to each. Nothing here asserts a time; it
prints the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the OAuth server and agent client live with the tests

from browservm.config import load_settings
from browservm.controller import open_controller, resolve_images
from browservm.guest.agent import PORT as AGENT_PORT
from browservm.hostnet.netns import NetworkNamespace
from browservm.progress import Progress
from tests.support.agent_client import FINAL_STATES, AgentClient
from tests.support.oauth_server import TestAuthorizationServer, listen

TARGET_MS = 100.0
AUTH_PORT = 18443  # the authorization server, on the gateway
MARK_PORT = 18444  # the tool-alone wrapper's one byte
SAMPLE = "/usr/lib/browservm/bin/browservm-sample-login"
READ_S = 3.0  # how long the consent page waits for the approval, at least
SETTLE_S = 5.0  # between runs: the last login's terminal and tool are stopped and the guest's CPU is idle again
WAIT_S = 300.0

# Runs in the guest as the desktop user (python3 -I -S -c WRAPPER ISSUER GATEWAY PORT CREDENTIALS RESULT).
# Stdlib and the image's own modules only; one argv word, so under the agent's 4096 characters.
WRAPPER = r"""
import json, os, select, socket, subprocess, sys, time
sys.path.insert(0, "/usr/lib/browservm")
from browservm.guest.credentials import CredentialsWatch
issuer, gateway, port, credentials, result = sys.argv[1:6]
stamp = os.path.join(os.path.dirname(result), "opened-%d" % os.getpid())
browser = stamp + ".sh"
opener = ("import sys; sys.path.insert(0, '/usr/lib/browservm'); "
          "from browservm.guest.opener import open_in_chromium; open_in_chromium(sys.argv[1])")
with open(browser, "w") as script:
    script.write('#!/bin/sh\ndate +%%s.%%N > %s\n/usr/bin/python3 -IS -c "%s" "$1"\ndate +%%s.%%N > %s.done\n'
                 % (stamp, opener, stamp))
os.chmod(browser, 0o700)
mark = socket.create_connection((gateway, int(port)), timeout=30)
watch = CredentialsWatch([credentials])
started = time.time()
tool = subprocess.Popen([SAMPLE, "--issuer", issuer, "--credentials", credentials, "--port", "0"],
                        env=dict(os.environ, BROWSER=browser))
while True:
    exited = tool.poll() is not None  # before the look: a tool that wrote, then exited, is seen as written
    written = watch.check(None, ["access_token"]) is not None
    if written or exited:
        break
    select.select([watch.fd], [], [], 1.0)  # inotify wakes it; the timeout only notices an exit
    watch.drain()
mark.sendall(b"w" if written else b"f")
status = tool.wait()
with open(stamp) as opened, open(stamp + ".done") as done:
    called = float(opened.read())
    opener_s = float(done.read()) - called
document = json.dumps({"open_s": called - started, "opener_s": opener_s, "written": written, "exit_status": status})
temporary = result + ".new"
fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, document.encode())
os.close(fd)
os.replace(temporary, result)
""".replace("SAMPLE", repr(SAMPLE))


class Approval:
    """The server answers the consent page's request only once `approve` is called: that is the approval.

    The person reads the page before approving: an approval comes READ_S after the page's request arrived
    (and, through the controller, once the login says `waiting-for-user`), so Chromium has finished opening
    the tab in both kinds of run and only what follows the approval is timed. Chromium may send the page's
    request more than once (its opener falls back to a second tab when DevTools answers late) and renders
    only one answer, so an approval answers every request held until then and lets later ones through,
    until `hold` starts the next run.
    """

    def __init__(self, server: TestAuthorizationServer) -> None:
        self._answer = server.authorize_page
        self._changed = threading.Condition()
        self._approved = False
        self._held_now = 0
        self._arrived: float | None = None  # the first request since `hold`
        self.answered = 0  # requests answered since `hold`: more than one means Chromium asked again
        server.authorize_page = self._held  # type: ignore[method-assign]  # the handler looks it up on the instance

    def _held(self, request: Any) -> Any:
        with self._changed:
            if self._arrived is None:
                self._arrived = time.perf_counter()
            self._held_now += 1
            self._changed.notify_all()
            self._changed.wait_for(lambda: self._approved, timeout=WAIT_S)
            self._held_now -= 1
            self.answered += 1
        return self._answer(request)

    def hold(self) -> None:
        with self._changed:
            self._approved = False
            self._arrived = None
            self.answered = 0

    def approve(self, timeout: float) -> float:
        """Wait for the page's request, give the person READ_S, answer it; the host's time of the answer."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._held_now > 0, timeout) or self._arrived is None:
                raise TimeoutError(f"no request for the consent page within {timeout:g} s")
            arrived = self._arrived
        time.sleep(max(0.0, arrived + READ_S - time.perf_counter()))
        with self._changed:
            self._approved = True
            released = time.perf_counter()
            self._changed.notify_all()
        return released


class Marks:
    """A listener on the gateway: the arrival time, on the host's clock, of each connection's one byte."""

    def __init__(self, netns: NetworkNamespace, host: str, port: int) -> None:
        with netns.entered():
            self._listener = socket.create_server((host, port))
        self.arrivals: queue.Queue[tuple[bytes, float]] = queue.Queue()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._one, args=(connection,), daemon=True).start()

    def _one(self, connection: socket.socket) -> None:
        with connection:
            connection.settimeout(WAIT_S)
            try:
                byte = connection.recv(1)
            except OSError:
                byte = b""
            self.arrivals.put((byte, time.perf_counter()))

    def close(self) -> None:
        self._listener.close()


@dataclass
class Pair:
    open_s: float
    approve_s: float
    starting_s: float = 0.0  # through the controller: POST -> `starting` (before the agent is asked)
    opener_s: float = 0.0  # tool alone: the opener's part, from its start to the tab open in Chromium


def _events(response: httpx.Response) -> Iterator[tuple[str, dict[str, Any]]]:
    """(state, login) per Server-Sent Event, as it arrives."""
    state = ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            state = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield state, json.loads(line.removeprefix("data: "))


def through_controller(api: httpx.Client, approval: Approval, vm_id: str, provider: str) -> Pair:
    approval.hold()
    started = time.perf_counter()
    answer = api.post("/v1/logins", json={"user": "bench", "provider": provider, "vm_id": vm_id, "keep_vm": True})
    if answer.status_code != 202:
        raise RuntimeError(f"POST /v1/logins answered {answer.status_code}: {answer.text}")
    login_id = answer.json()["login_id"]
    starting = waiting = released = 0.0
    with api.stream("GET", f"/v1/logins/{login_id}/events") as events:
        for state, login in _events(events):
            if state == "starting" and not starting:
                starting = time.perf_counter()
            elif state == "waiting-for-user" and not waiting:
                waiting = time.perf_counter()
                released = approval.approve(WAIT_S)
            elif state == "captured":
                return Pair(waiting - started, time.perf_counter() - released, starting_s=starting - started)
            elif state in FINAL_STATES:
                raise RuntimeError(f"login {login_id} ended {state}: {login}")
    raise RuntimeError(f"the event stream of login {login_id} ended before `captured`")


def tool_alone(agent: AgentClient, approval: Approval, marks: Marks, issuer: str, gateway: str, run: str) -> Pair:
    approval.hold()
    result = f"/home/browser/.bench/result-{run}.json"
    command = ["/usr/bin/python3", "-I", "-S", "-c", WRAPPER, issuer, gateway, str(MARK_PORT),
               f"/home/browser/.bench/tool-{run}.json", result]
    answer = agent.request("POST", "/v1/login", {"provider": "bench-tool-alone", "command": command, "env": {},
                                                 "credentials": [result], "required_keys": ["open_s"],
                                                 "timeout_s": WAIT_S})
    if answer.status != 202:
        raise RuntimeError(f"the agent refused the wrapper: {answer}")
    released = approval.approve(WAIT_S)
    byte, arrived = marks.arrivals.get(timeout=WAIT_S)
    if byte != b"w":
        raise RuntimeError(f"the tool alone wrote no credentials: {agent.wait_for(FINAL_STATES, WAIT_S)}")
    status = agent.wait_for(FINAL_STATES, WAIT_S)  # the wrapper's result file: captured and handed over
    handover = agent.request("POST", "/v1/handover")
    if status["state"] != "captured" or handover.status != 200:
        raise RuntimeError(f"no result from the wrapper: {status} {handover}")
    document = json.loads(base64.b64decode(handover.body["files"][result]))
    return Pair(float(document["open_s"]), arrived - released, opener_s=float(document["opener_s"]))


def _providers_file(path: Path, issuer: str, count: int) -> None:
    """bench-0 .. bench-N: the sample tool, each with a credentials file of its own."""
    entries = []
    for n in range(count):
        credentials = f"/home/browser/.sample/bench-{n}.json"
        entries.append(f'[providers.bench-{n}]\npackage = "browservm"\n'
                       f'command = ["{SAMPLE}", "--issuer", "{issuer}", "--credentials", "{credentials}", '
                       f'"--port", "0"]\nenv = {{}}\nbrowser = "BROWSER"\ncallback = "any"\n'
                       f'credentials = ["{credentials}"]\nrequired_keys = ["access_token", "refresh_token"]\n'
                       f"timeout_s = {int(WAIT_S)}\n")
    path.write_text("\n".join(entries))


@contextmanager
def _serve(argv: list[str], env: dict[str, str]) -> Iterator[None]:
    """`browservm serve` in a process of its own, until the block ends (SIGTERM: it leaves its VMs running)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serve: listening"):
                listening.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        if not listening.wait(120):
            raise RuntimeError("serve did not start:\n" + "".join(lines[-40:]))
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _vmm_pids(state_dir: Path) -> list[int]:
    """VMMs this run started: their command line names its state directory."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"qemu-system" in cmdline and str(state_dir).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def measure(work: Path, runs: int, warmup: int) -> tuple[list[Pair], list[Pair]]:
    progress = Progress()
    state_dir = work / "state"
    netns_name = f"bvbench-login-{os.getpid()}"
    base = load_settings(netns=netns_name, state_dir=state_dir, vmm="qemu",
                         image_profile="oauth", guest_ports=(AUTH_PORT, MARK_PORT))
    images = resolve_images(base, progress)  # built (or found cached) before serve starts, not inside it
    settings = load_settings(netns=netns_name, state_dir=state_dir, vmm="qemu", kernel=images.kernel,
                             rootfs=images.rootfs, guest_ports=(AUTH_PORT, MARK_PORT))
    with open_controller(settings) as controller:
        try:
            controller.network.up()
            gateway = str(controller.network.plan.segments[0].gateway.ip)
            netns = controller.network.netns
            issuer = f"http://{gateway}:{AUTH_PORT}"
            providers = work / "providers.toml"
            _providers_file(providers, issuer, warmup + runs)
            port = _free_port()
            argv = [sys.executable, "-m", "browservm", "serve", "--netns", netns_name, "--state-dir", str(state_dir),
                    "--kernel", str(images.kernel), "--rootfs", str(images.rootfs), "--vmm", "qemu",
                    "--listen", f"127.0.0.1:{port}", "--guest-port", str(AUTH_PORT), "--guest-port", str(MARK_PORT),
                    "--idle-timeout", "86400"]  # no viewer watches this VM; it must not be reaped meanwhile
            with _serve(argv, {**os.environ, "BROWSERVM_PROVIDERS_FILE": str(providers)}), \
                    listen(host=gateway, port=AUTH_PORT, netns=netns, approve="auto") as server:
                marks = Marks(netns, gateway, MARK_PORT)
                key = (state_dir / "api.key").read_text().strip()
                api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                                   timeout=httpx.Timeout(900.0), trust_env=False)
                try:
                    return _runs(api, controller.manager.secrets, Approval(server), marks, issuer, gateway,
                                 netns, runs, warmup, progress)
                finally:
                    api.close()
                    marks.close()
        finally:
            for record in asyncio.run(controller.manager.all()):
                asyncio.run(controller.manager.destroy(record.vm_id))
            controller.network.down(force=True)
            for pid in _vmm_pids(state_dir):
                os.kill(pid, signal.SIGKILL)


def _runs(api: httpx.Client, secrets: Callable[[str], dict[str, str]], approval: Approval, marks: Marks,
          issuer: str, gateway: str, netns: NetworkNamespace, runs: int, warmup: int,
          progress: Progress) -> tuple[list[Pair], list[Pair]]:
    progress.stage("boot", "one oauth VM through the controller (minutes under emulation)")
    vm = api.post("/v1/vms", params={"wait": "true"}, json={"user": "bench", "vcpus": 1, "mem_mib": 2048})
    if vm.status_code != 200 or vm.json()["state"] != "ready":
        raise RuntimeError(f"the VM did not come up: {vm.text}")
    vm_id, address = vm.json()["vm_id"], vm.json()["address"].split("/")[0]
    agent = AgentClient(address, AGENT_PORT, secrets(vm_id)["agent"], netns=netns, timeout=30)
    full: list[Pair] = []
    alone: list[Pair] = []
    for n in range(warmup + runs):
        kind = "warm-up" if n < warmup else f"run {n - warmup + 1}/{runs}"
        pair = through_controller(api, approval, vm_id, f"bench-{n}")
        progress.stage(kind, f"controller+agent: open {pair.open_s:.3f} s, approve {pair.approve_s:.3f} s "
                             f"({approval.answered} page request(s))")
        time.sleep(SETTLE_S)
        single = tool_alone(agent, approval, marks, issuer, gateway, str(n))
        progress.stage(kind, f"tool alone: open {single.open_s:.3f} s, approve {single.approve_s:.3f} s "
                             f"({approval.answered} page request(s))")
        time.sleep(SETTLE_S)
        if n >= warmup:
            full.append(pair)
            alone.append(single)
    return full, alone


def _row(label: str, through: list[float], alone: list[float]) -> str:
    median_through, median_alone = statistics.median(through), statistics.median(alone)
    added_ms = (median_through - median_alone) * 1000
    return (f"  {label:<36} {median_through:7.3f} s ({min(through):.3f}-{max(through):.3f})   "
            f"{median_alone:7.3f} s ({min(alone):.3f}-{max(alone):.3f})   {added_ms:8.1f} ms   "
            f"{added_ms / TARGET_MS:6.2f}x the {TARGET_MS:g} ms target")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bvbench-login-") as scratch:
        full, alone = measure(Path(scratch), args.runs, args.warmup)
    print(f"\nsample login in one booted oauth VM (QEMU/TCG), {args.runs} runs of each, median (min-max):")
    print(f"  {'':<36} {'controller+agent':<27} {'tool alone':<27} {'added':<11} ratio (added / target)")
    print(_row("POST /v1/logins -> waiting-for-user", [p.open_s for p in full], [p.open_s for p in alone]))
    print(_row("approval -> captured", [p.approve_s for p in full], [p.approve_s for p in alone]))
    starting_ms = statistics.median(p.starting_s for p in full) * 1000
    opener_ms = statistics.median(p.opener_s for p in alone) * 1000
    added_ms = (statistics.median(p.open_s for p in full) - statistics.median(p.open_s for p in alone)) * 1000
    rest_ms = added_ms - starting_ms - opener_ms
    print(f"  of the {added_ms:.0f} ms added before waiting-for-user (medians): POST -> starting (the controller, "
          f"before the agent is asked) {starting_ms:.0f} ms; the opener (Python start-up, DevTools tab; timed in "
          f"the tool-alone runs) {opener_ms:.0f} ms; the rest (the agent starting the terminal, xterm, the "
          f"runner, the opener telling the agent, the controller's 0.1 s poll) {rest_ms:.0f} ms")


if __name__ == "__main__":
    main()
