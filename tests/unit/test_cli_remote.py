"""`browservm vm ... --url`: the CLI against the real API (build_app) on a real uvicorn on loopback.

The controller behind it is a real ControllerService whose manager runs on the fakes of the
manager's tests (TAPs as a set, the guest's hops as gates, `sleep` as the VMM). The CLI runs
in-process (`main([...])`, output captured) or as `python -m browservm` (environment variables,
Ctrl-C). No root. Every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest

from browservm.api.app import build_app
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.cli import main, output
from browservm.cli import vm as vm_cli
from browservm.cli.remote import LOCAL_ONLY, REMOTE_ONLY, ControllerStopped, follow
from browservm.client import Client, Vm
from browservm.client.sse import server_sent_events
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.hostnet.host import HostNetwork
from browservm.progress import BuildStep
from browservm.vm import hops
from browservm.vm.desktop_path import RFB, desktop_path
from browservm.vm.parts import Limits
from browservm.vm.records import VmRecords
from tests.support.browsers import served_in_thread

from .fakes import NOTHING, FakeProbes, Parts, make_parts, stop_all

NAMES = desktop_path(RFB).names  # every hop of a create, on the default desktop path

DEADLINE = 30.0  # for any one condition; a passing run meets each in well under a second
KEY = "test-api-key-0123456789"
T = TypeVar("T")


@dataclass
class Served:
    url: str
    state_dir: Path
    parts: Parts
    probes: FakeProbes
    service: ControllerService
    loop: asyncio.AbstractEventLoop

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work` on the server's event loop, where the manager lives."""
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(DEADLINE)

    def release(self, hop: str) -> None:
        self.loop.call_soon_threadsafe(self.probes.hang[hop].set)

    def records(self) -> VmRecords:
        return VmRecords(self.parts.store)


@pytest.fixture
def served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    for name in ("BROWSERVM_URL", "BROWSERVM_API_KEY", "BROWSERVM_STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    parts = make_parts(tmp_path)
    probes = FakeProbes(parts.ipam)
    manager = parts.manager(probes, limits=Limits(max_vms=8, max_vms_per_user=8))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    settings = load_settings(state_dir=tmp_path, listen=f"127.0.0.1:{port}")
    # The fake network stands in for HostNetwork: the service only hands it to the manager here.
    service = ControllerService(Controller(settings, parts.store, cast(HostNetwork, parts.network), manager),
                                api_key=KEY, tokens=ViewerTokens(os.urandom(32)))
    (tmp_path / "api.key").write_text(KEY + "\n")
    def stop(loop: asyncio.AbstractEventLoop) -> None:
        for event in probes.hang.values():  # a hop left hanging would hold its create
            loop.call_soon_threadsafe(event.set)
        asyncio.run_coroutine_threadsafe(service.stop(), loop).result(DEADLINE)

    try:
        with served_in_thread(build_app(service), listener, DEADLINE, stop) as loop:
            yield Served(f"http://127.0.0.1:{port}", tmp_path, parts, probes, service, loop)
    finally:
        stop_all(parts)


@pytest.fixture
def cli(served: Served, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`browservm vm ARGS --url URL --state-dir DIR` in this process: exit code, stdout, stderr."""
    def run(*args: str, url: str | None = None, state_dir: Path | None = None) -> tuple[int, str, str]:
        capsys.readouterr()
        code = main(["vm", *args, "--url", url or served.url, "--state-dir", str(state_dir or served.state_dir)])
        out, err = capsys.readouterr()
        return code, out, err
    return run


Cli = Callable[..., tuple[int, str, str]]


def created(out: str) -> str:
    return out.split(":", 1)[0]


# --- create, ls, show ------------------------------------------------------------------------------


def test_create_prints_each_stage_then_the_record_and_a_viewer_link_that_opens(served: Served, cli: Cli) -> None:
    code, out, err = cli("create", "--user", "ann")
    assert code == 0, err
    reported = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("  [")]
    assert reported == list(NAMES)  # each once, in order, as local mode prints them
    vm_id = created(out)
    assert out.startswith(f"{vm_id}: ready\n  user       ann\n")
    viewer = next(line.split()[1] for line in out.splitlines() if line.startswith("  viewer "))
    assert viewer.startswith(f"{served.url}/view/{vm_id}?token=")
    assert f"browservm vm viewer {vm_id} --url {served.url}" in out
    state = httpx.get(viewer.replace(f"/view/{vm_id}?", f"/view/{vm_id}/state?"), trust_env=False)
    assert state.status_code == 200 and state.json()["state"] == "ready"


def test_json_of_a_vm_agrees_with_local_mode_field_by_field(served: Served, cli: Cli) -> None:
    code, out, _ = cli("create", "--vcpus", "2", "--mem", "512", "--json")
    assert code == 0
    made = json.loads(out)
    assert set(made["viewer"]) == {"url", "token", "expires_at", "expires_at_rfc3339"}
    vm_id = made["vm_id"]
    record = served.records().get(vm_id)
    assert record is not None
    local = json.loads(json.dumps(vm_cli.record_view(record)))  # as local mode's `vm show --json` prints it
    code, out, _ = cli("show", vm_id, "--json")
    remote = json.loads(out)
    code_ls, out_ls, _ = cli("ls", "--json")
    [listed] = json.loads(out_ls)
    moments = {"uptime_s": 0, "idle_s": 0}  # two requests, moments apart
    assert code == code_ls == 0 and listed | moments == remote | moments
    assert set(local) - set(remote) == LOCAL_ONLY and set(remote) - set(local) == REMOTE_ONLY
    assert {k: remote[k] for k in set(local) & set(remote)} == {k: local[k] for k in set(local) & set(remote)}
    assert (remote["vcpus"], remote["mem_mib"], remote["state"]) == (2, 512, "ready")


def test_human_show_and_ls_print_local_modes_lines_less_what_the_api_does_not_report(
        served: Served, cli: Cli) -> None:
    _, out, _ = cli("create", "--user", "bob")
    vm_id = created(out)
    record = served.records().get(vm_id)
    assert record is not None
    code, remote, _ = cli("show", vm_id)
    assert code == 0
    local = _printed(lambda: output.print_vm(vm_cli.record_view(record), as_json=False))
    only_local = ("  gateway", "  bridge", "  network", "  directory", "  pid", "  uptime")
    assert [line for line in local.splitlines() if not line.startswith(only_local)] == \
           [line for line in remote.splitlines() if not line.startswith(("  pid", "  uptime", "  viewers"))]
    assert f"  pid        {record.pid} (as the controller recorded it)\n" in remote
    assert "  viewers    0 connected, none for " in remote
    code, listed, _ = cli("ls")
    header, row = listed.splitlines()
    assert code == 0 and header.split() == ["ID", "STATE", "USER", "ADDRESS", "TAP", "PID", "UPTIME"]
    assert row.split()[:6] == [vm_id, "ready", "bob", record.address, record.tap, str(record.pid)]


def test_a_failed_create_prints_the_hop_reason_and_hint_and_exits_1(served: Served, cli: Cli) -> None:
    served.probes.fail["rfb.banner"] = "expected '101 Switching Protocols', got 'HTTP/1.1 200'"
    code, out, err = cli("create")
    assert code == 1
    reported = [line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("  [")]
    assert reported == list(NAMES[:NAMES.index("rfb.banner")])
    assert "\n  failed at  rfb.banner\n  reason     expected '101 Switching Protocols'" in out
    assert "  viewer     " not in out and served.parts.leftovers() == NOTHING
    code, out, _ = cli("create", "--json")
    assert code == 1 and json.loads(out)["failure"]["hop"] == "rfb.banner" and "viewer" not in json.loads(out)


# --- rm, console, viewer ---------------------------------------------------------------------------


def test_rm_is_idempotent(served: Served, cli: Cli) -> None:
    _, out, _ = cli("create")
    vm_id = created(out)
    assert cli("rm", vm_id) == (0, f"{vm_id}: removed\n", "")
    assert cli("rm", vm_id) == (0, f"{vm_id}: no such VM (nothing to do)\n", "")
    code, out, _ = cli("rm", vm_id, "--json")
    assert (code, json.loads(out)) == (0, {vm_id: "absent"})
    assert served.parts.leftovers() == NOTHING


def test_console_prints_the_last_lines_and_refuses_follow(served: Served, cli: Cli) -> None:
    _, out, _ = cli("create")
    vm_id = created(out)
    (served.parts.vm_root / vm_id / "console.log").write_text("".join(f"line {i}\n" for i in range(10)))
    assert cli("console", vm_id, "--lines", "3") == (0, "line 7\nline 8\nline 9\n", "")
    code, out, err = cli("console", vm_id, "--follow")
    assert (code, out) == (2, "") and "--follow is for local mode (without --url)" in err


def test_viewer_prints_a_link_and_local_mode_says_it_needs_a_controller(
        served: Served, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = cli("create")
    vm_id = created(out)
    code, out, _ = cli("viewer", vm_id)
    assert code == 0 and out.startswith(f"{served.url}/view/{vm_id}?token=") and out.count("\n") == 1
    code, out, _ = cli("viewer", vm_id, "--json")
    assert code == 0 and json.loads(out)["url"].startswith(f"{served.url}/view/{vm_id}?token=")
    capsys.readouterr()
    # Local mode: refused before any state is opened (the state directory does not even exist).
    code = main(["vm", "viewer", vm_id, "--state-dir", str(served.state_dir / "absent")])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "") and "`vm viewer` needs --url URL (or BROWSERVM_URL)" in err
    assert "a running controller (`browservm serve`)" in err and not (served.state_dir / "absent").exists()


def test_labels_a_timeout_filters_and_extend(served: Served, cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli("create", "--label", "app=crm", "--label", "env=dev", "--timeout", "600", "--json")
    made = json.loads(out)
    assert code == 0 and made["labels"] == {"app": "crm", "env": "dev"}
    assert made["expires_at"] == pytest.approx(made["created_at"] + 600, abs=1)
    _, out, _ = cli("create", "--user", "bob", "--json")
    other = json.loads(out)["vm_id"]
    code, out, _ = cli("ls", "--label", "app=crm", "--json")
    assert code == 0 and [vm["vm_id"] for vm in json.loads(out)] == [made["vm_id"]]
    _, out, _ = cli("ls", "--user", "BOB", "--state", "ready", "--json")
    assert [vm["vm_id"] for vm in json.loads(out)] == [other]
    code, out, _ = cli("extend", made["vm_id"], "1200")
    assert code == 0 and out.startswith(f"{made['vm_id']} ends at ")
    for args in (("create", "--label", "Bad Key=x"), ("create", "--label", "novalue"), ("ls", "--label", "a")):
        code, out, err = cli(*args)
        assert (code, out) == (2, "") and err.startswith("browservm: error: label: must be KEY=VALUE"), err
    code, _, err = cli("extend", made["vm_id"], "5")
    assert code == 2 and "timeout_s" in err
    capsys.readouterr()
    code = main(["vm", "extend", made["vm_id"], "600", "--state-dir", str(served.state_dir / "absent")])
    assert code == 2 and "`vm extend` needs --url URL" in capsys.readouterr().err


# --- errors ----------------------------------------------------------------------------------------


def test_a_bad_field_exits_2_naming_it(served: Served, cli: Cli) -> None:
    code, out, err = cli("create", "--vcpus", "99")
    assert (code, out) == (2, "") and err.startswith("browservm: error: vcpus: must be between 1 and 8")
    code, out, _ = cli("create", "--mem", "16", "--json")
    error = json.loads(out)["error"]
    assert code == 2 and (error["type"], error["field"]) == ("InvalidInput", "mem_mib")
    code, _, err = cli("show", "Not/An-Id")  # checked before it is sent, as local mode checks it
    assert code == 2 and err.startswith("browservm: error: vm_id: ")
    code, _, err = cli("create", "--keep-failed")
    assert code == 2 and "--keep-failed is for local mode" in err
    code, _, err = cli("create", "--template", "nosuch")  # the controller's templates decide
    assert code == 2 and err.startswith("browservm: error: template: no such template (known: default)"), err
    assert served.records().all() == []


def test_an_unknown_vm_exits_1(served: Served, cli: Cli) -> None:
    assert cli("show", "vm-000000000000") == (1, "", "browservm: no VM vm-000000000000\n")
    assert cli("console", "vm-000000000000") == (1, "", "browservm: error: no VM vm-000000000000\n")
    code, out, _ = cli("viewer", "vm-000000000000", "--json")
    assert (code, json.loads(out)) == (1, {"error": {"type": "VmNotFound", "message": "no VM vm-000000000000"}})


def test_no_controller_at_the_url_is_one_clear_line(served: Served, cli: Cli) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        url = f"http://127.0.0.1:{taken.getsockname()[1]}"
    # The port was free a moment ago, and nothing listens on it now.
    assert cli("ls", url=url) == (1, "", f"browservm: error: no controller answers at {url}: "
                                         "is `browservm serve` running?\n")
    code, out, _ = cli("create", "--json", url=url)
    assert code == 1 and json.loads(out)["error"]["type"] == "ControllerUnreachable"


def test_a_wrong_key_is_refused_naming_where_it_came_from(
        served: Served, cli: Cli, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path_factory.mktemp("other-state")
    (other / "api.key").write_text("not-the-key\n")
    code, out, err = cli("ls", state_dir=other)
    assert (code, out) == (1, "")
    assert err.startswith(f"browservm: error: the API key was refused by {served.url} (from {other / 'api.key'})")
    monkeypatch.setenv("BROWSERVM_API_KEY", "also-not-the-key")
    code, _, err = cli("ls")
    assert code == 1 and "the API key was refused by" in err and "(from BROWSERVM_API_KEY)" in err
    monkeypatch.delenv("BROWSERVM_API_KEY")
    code, _, err = cli("ls", state_dir=other / "empty")
    assert code == 1 and f"state {other / 'empty' / 'api.key'}: no API key here" in err


def test_the_key_comes_from_the_environment_before_the_state_directory(
        served: Served, cli: Cli, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROWSERVM_API_KEY", KEY)
    assert cli("ls", "--json", state_dir=tmp_path_factory.mktemp("no-key-here")) == (0, "[]\n", "")


def test_a_proxy_in_the_environment_is_not_used_for_loopback(served: Served, cli: Cli,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        dead_proxy = f"http://127.0.0.1:{taken.getsockname()[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    assert cli("ls", "--json") == (0, "[]\n", "")
    assert Client("http://controller.example:8080", api_key=KEY)._http.trust_env


# --- following a boot ------------------------------------------------------------------------------


def test_python_m_browservm_with_url_and_key_from_the_environment_follows_hops_as_they_pass(
        served: Served, tmp_path: Path) -> None:
    hang = served.probes.hang_at("guest.network")
    proc = _browservm("vm", "create", url=served.url, state_dir=tmp_path / "nothing-here")
    try:
        seen = _read_until(proc, "] vmm.spawn\n")  # subscribed by now: the rest arrives live
        assert "guest.network" not in seen and not hang.is_set()
        served.release("guest.network")
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    lines = (seen + err).splitlines()
    assert [line.split("] ", 1)[1] for line in lines if line.startswith("  [")] == list(NAMES)
    assert ": ready\n" in out and "/view/vm-" in out


def test_ctrl_c_while_it_boots_deletes_the_vm_as_a_local_create_would(served: Served, tmp_path: Path) -> None:
    served.probes.hang_at("guest.network")
    proc = _browservm("vm", "create", url=served.url, state_dir=tmp_path / "nothing-here")
    try:
        _read_until(proc, "] vmm.spawn\n")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and "browservm: cancelled: removing VM vm-" in err
    assert served.records().all() == [] and served.parts.leftovers() == NOTHING


def test_the_first_create_on_a_new_host_talks_within_2_s_and_prints_each_build_step(
        served: Served, tmp_path: Path) -> None:
    """On a fresh host the controller builds the kernel and image first (minutes): the person is told at
    once that the VM is being made, then each step, with the build's log, and the viewer page says it."""
    served.parts.build_steps = [
        BuildStep("the guest kernel", 1, 7, "tinyconfig", log="/root/.cache/browservm/kernels/k.log"),
        BuildStep("the guest kernel", 5, 7, "vmlinux", "make -j2 vmlinux", log="/root/.cache/browservm/kernels/k.log")]
    served.parts.build_done = threading.Event()
    started = time.monotonic()
    proc = _browservm("vm", "create", url=served.url, state_dir=tmp_path / "nothing-here")
    try:
        first = _read_until(proc, "\n")
        assert time.monotonic() - started < 2.0, first  # the interpreter's start included
        assert "is being created by" in first and "Ctrl-C deletes it" in first
        # The step under way when it subscribed (both came at once), then the build's log, once.
        told = _read_until(proc, "] log      /root/.cache/browservm/kernels/k.log\n")
        assert "] build    building the guest kernel, step 5 of 7: vmlinux" in told
        [record] = served.records().all()
        viewer = httpx.post(f"{served.url}/v1/vms/{record.vm_id}/viewer", headers={"Authorization": f"Bearer {KEY}"},
                            trust_env=False).json()
        page = httpx.get(viewer["url"].replace(f"/view/{record.vm_id}?", f"/view/{record.vm_id}/state?"),
                         trust_env=False).json()
        assert page["building"] == "building the guest kernel, step 5 of 7: vmlinux"  # not the host's commands
        served.parts.build_done.set()
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        served.parts.build_done.set()
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert ": ready" in out and "] rfb.banner" in err


def test_a_quiet_stream_is_checked_and_followed_again(served: Served) -> None:
    hang = served.probes.hang_at("guest.network")
    checks: list[str] = []

    class Watched(Client):
        def get_vm(self, vm_id: str) -> Vm:
            record = super().get_vm(vm_id)
            checks.append(record.state)
            if len(checks) == 1:  # the stream went quiet once: let the VM go on
                served.release("guest.network")
            return record

    stages: list[str] = []
    with Watched(served.url, api_key=KEY, events_quiet=0.3) as client:
        vm_id = client.create_vm("ann", 1, 512).vm_id
        record = follow(client, vm_id, lambda name, seconds: stages.append(name))
    assert hang.is_set() and checks[0] in ("creating", "booting") and record.state == "ready"
    assert stages == list(NAMES)  # the second subscription's replay of passed stages is not reported twice


def test_a_build_step_as_long_as_a_compile_is_told_again_each_quiet_stretch(served: Served) -> None:
    """A kernel's compile is one step of minutes: the person is told it goes on, not left in silence."""
    served.parts.build_steps = [BuildStep("the guest kernel", 6, 8, "vmlinux", "make -j2 vmlinux")]
    served.parts.build_done = done = threading.Event()
    notes: list[tuple[str, str]] = []

    def note(kind: str, detail: str) -> None:
        notes.append((kind, detail))
        if kind == "still":
            done.set()

    try:
        with Client(served.url, api_key=KEY, events_quiet=0.5) as client:
            vm_id = client.create_vm("ann", 1, 512).vm_id
            record = follow(client, vm_id, lambda name, seconds: None, note)
    finally:
        done.set()
    step = "building the guest kernel, step 6 of 8: vmlinux (make -j2 vmlinux)"
    assert notes[:2] == [("build", step), ("still", step)] and record.state == "ready"


def test_a_stream_the_controller_ends_while_the_vm_boots_says_so(served: Served) -> None:
    served.probes.hang_at("guest.network")

    def stage(name: str, seconds: float) -> None:
        if name == hops.VMM_SPAWN:  # subscribed: the controller now shuts its streams, as when it stops
            served.loop.call_soon_threadsafe(served.service.events.close)

    with Client(served.url, api_key=KEY) as client:
        vm_id = client.create_vm("ann", 1, 512).vm_id
        with pytest.raises(ControllerStopped, match=f"ended the event stream while VM {vm_id} was booting"):
            follow(client, vm_id, stage)


def test_server_sent_events_are_parsed_field_by_field() -> None:
    stream = [": keep-alive", "", "event: stage", 'data: {"event": "net.lease",', 'data: "seconds": 0.5}', "",
              "event: ready", "data:{}", "", "data: {\"x\": 1}", ""]
    assert list(server_sent_events(iter(stream))) == [
        ("stage", {"event": "net.lease", "seconds": 0.5}), ("ready", {}), ("message", {"x": 1})]


# --- helpers ---------------------------------------------------------------------------------------


def _printed(work: Callable[[], None]) -> str:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        work()
    return buffer.getvalue()


def _browservm(*args: str, url: str, state_dir: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROWSERVM_")}
    env |= {"BROWSERVM_URL": url, "BROWSERVM_API_KEY": KEY, "BROWSERVM_STATE_DIR": str(state_dir)}
    return subprocess.Popen([sys.executable, "-m", "browservm", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _read_until(proc: subprocess.Popen[str], text: str) -> str:
    """stderr as read until it holds `text`; fails at the deadline or if the command ends first.

    Read from the descriptor, not the buffered file, so select() sees everything not yet read.
    """
    assert proc.stderr is not None
    fd, seen, end = proc.stderr.fileno(), b"", time.monotonic() + DEADLINE
    while text.encode() not in seen:
        remaining = end - time.monotonic()
        assert remaining > 0, f"no {text!r} within {DEADLINE} s; stderr so far: {seen!r}"
        if select.select([fd], [], [], remaining)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the command ended before {text!r}: {seen!r}"
            seen += chunk
    return seen.decode()
