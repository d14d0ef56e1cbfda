"""browservm-agent: runs a CLI tool's login inside the VM and hands its credentials to the controller.

The controller talks to it over HTTP on the guest's TCP 7000 (DESIGN.md, "The OAuth agent's
contract"). Every request carries `Authorization: Bearer <secrets.agent>` from the VM's config
disk; anything else gets 401 and nothing more. JSON in and out:

    GET  /v1/status    {"state", "provider", "auth_url_host", "exit_status", "output", "reason"}
    POST /v1/login     {"provider", "command", "env", "credentials", "required_keys", "timeout_s"} -> 202
    POST /v1/handover  -> {"files": {path: base64}, "sha256": ...} once, after `captured`; then 410
    POST /v1/cancel    kills the tool's process group -> state cancelled

States: idle -> starting -> waiting-for-user -> captured | failed | timed-out | cancelled. A
login in a final state may be followed by another one; a running one answers a second with 409.

How a login runs. The tool runs as the desktop user (`browser`) in a terminal window (xterm) on
the desktop's display, so the person sees what it says; inside the terminal `browservm-toolrun`
(toolrun.py) starts it on a pseudo-terminal of its own, copies what it prints both to the window
and to a log in the login's run directory (the agent serves the log's last lines as `output`),
and records the tool's exit status there. The tool's `BROWSER` is the opener (opener.py), which
opens the URL in the desktop's Chromium and tells this agent on a loopback-only listener,
authenticated by a token in a file only root and the desktop user's group can read; the state
becomes `waiting-for-user` with the URL's host. The credentials files are watched with inotify
(on the deepest directory of each path that exists, re-armed as directories appear); success is
every file present, a regular file owned by the desktop user, at most 1 MiB, and parsing as a
JSON object with every one of `required_keys`. The tool exiting first is `failed` with its exit
status and output (unless the files are already good); the deadline is `timed-out`; either way,
and on cancel, the tool's process group, the terminal's and the runner's are killed, and their
end is awaited.

On capture one line goes to the console (the systemd unit sends stdout there):

    browservm-agent: captured provider=sample files=1 sha256=<hex>

`sha256` is `credentials_digest(files)`, defined precisely there; the host recomputes it over
what the handover returned. Nothing of the credentials themselves is ever printed or logged.

Bounds on what a request may send: a body of 64 KiB, 64 command words, 64 environment variables,
16 credentials files (absolute, normalised, under the desktop user's home), 64 required keys, a
timeout of 1 to 3600 s. Stdlib-only: it runs in the guest.

Here: the login state machine (Agent), and the program that serves it. Beside it: agent_request.py
(a login request, checked), agent_http.py (the keyed JSON server), credentials.py (watching and
judging the files, their digest), rundir.py (what toolrun leaves in a login's directory).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import pwd
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from browservm.guest import configdisk, rundir
from browservm.guest.agent_http import AgentKey, Route, Server, read_secret
from browservm.guest.agent_request import BadRequest, LoginRequest
from browservm.guest.credentials import CredentialsWatch, captured_marker, credentials_digest
from browservm.guest.markers import format_marker

PORT = 7000
OPENER_PORT = 7001  # loopback only: the opener's notifications
DEFAULT_RUN_DIR = Path("/run/browservm-agent")
OPENER_FILE = "opener.json"  # in the run directory: {"url": ..., "token": ...}, mode 0640, group of the desktop user
DEFAULT_USER = "browser"
DEFAULT_DISPLAY = ":1"
BIN = Path("/usr/lib/browservm/bin")

_STOP_GRACE_S = 2.0
_CAPTURE_GRACE_S = 3.0  # a tool that wrote its credentials usually exits by itself; give it the chance
_DISPLAY_WAIT_S = 60.0

IDLE, STARTING, WAITING, CAPTURED, FAILED, TIMED_OUT, CANCELLED = (
    "idle", "starting", "waiting-for-user", "captured", "failed", "timed-out", "cancelled")
RUNNING = (STARTING, WAITING)


@dataclass(frozen=True)
class DesktopUser:
    """Who the tool runs as; `uid` None: as the agent itself (tests that do not run as root)."""

    name: str
    home: Path
    uid: int | None = None
    gid: int | None = None

    @classmethod
    def lookup(cls, name: str) -> DesktopUser:
        entry = pwd.getpwnam(name)
        if os.geteuid() != 0:
            return cls(name, Path(entry.pw_dir))
        return cls(name, Path(entry.pw_dir), entry.pw_uid, entry.pw_gid)


@dataclass(frozen=True)
class AgentConfig:
    secret: str
    user: DesktopUser
    run_dir: Path
    config_disk: Path | None = None  # reread for a new key (AgentKey); None: the key never changes
    terminal: str | None = "xterm"  # None: no window, the runner runs directly (tests, a head-less image)
    display: str = DEFAULT_DISPLAY
    opener: str = str(BIN / "browservm-opener")
    toolrun: tuple[str, ...] = (str(BIN / "browservm-toolrun"),)
    path: str = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Login:
    request: LoginRequest
    directory: Path
    state: str = STARTING
    auth_url_host: str | None = None
    exit_status: int | None = None
    reason: str | None = None
    files: dict[str, bytes] | None = None
    digest: str | None = None
    handed_over: bool = False
    started: float = field(default_factory=time.monotonic)
    wake: tuple[int, int] = field(default_factory=lambda: os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK))
    cancel_requested: bool = False


class Agent:
    """The login state machine; the HTTP front ends (AgentServer, OpenerServer) only call it."""

    def __init__(self, config: AgentConfig, emit: Callable[[str], None] | None = None) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._login: Login | None = None
        self._count = 0
        self._emit = emit or (lambda line: print(line, flush=True))
        self.opener_token = secrets.token_hex(32)

    # --- what the controller asks -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            login = self._login
            if login is None:
                return {"state": IDLE, "provider": None, "auth_url_host": None, "exit_status": None,
                        "output": [], "reason": None}
            return {"state": login.state, "provider": login.request.provider, "auth_url_host": login.auth_url_host,
                    "exit_status": login.exit_status, "output": rundir.output_lines(login.directory),
                    "reason": login.reason}

    def login(self, request: LoginRequest) -> tuple[int, dict[str, Any]]:
        with self._lock:
            if self._login is not None and self._login.state in RUNNING:
                return HTTPStatus.CONFLICT, {"error": "a login is running", "state": self._login.state}
            if self._login is not None:
                _close_pipe(self._login.wake)
            self._count += 1
            directory = self.config.run_dir / f"login-{self._count}"
            login = Login(request, directory)
            self._login = login
        try:
            self._prepare(directory)
        except OSError as exc:
            self._finish(login, FAILED, f"cannot prepare {directory}: {exc.strerror}")
            return HTTPStatus.ACCEPTED, {"state": login.state}
        threading.Thread(target=self._supervise, args=(login,), name="login", daemon=True).start()
        return HTTPStatus.ACCEPTED, {"state": STARTING}

    def handover(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            login = self._login
            if login is not None and login.handed_over:
                return HTTPStatus.GONE, {"error": "the credentials were handed over already"}
            if login is None or login.state != CAPTURED or login.files is None:
                return HTTPStatus.CONFLICT, {"error": "nothing captured", "state": login.state if login else IDLE}
            files, digest = login.files, login.digest
            login.files = None  # exactly once: the agent keeps no copy
            login.handed_over = True
        return HTTPStatus.OK, {"files": {p: base64.b64encode(d).decode() for p, d in files.items()}, "sha256": digest}

    def cancel(self) -> tuple[int, dict[str, Any]]:
        with self._lock:
            login = self._login
            if login is None or login.state not in RUNNING:
                return HTTPStatus.CONFLICT, {"error": "no login is running", "state": login.state if login else IDLE}
            login.cancel_requested = True
        _wake(login)
        # The supervisor kills the process groups, then settles the state: the answer waits for that.
        with self._changed:
            self._changed.wait_for(lambda: login.state not in RUNNING, timeout=4 * _STOP_GRACE_S)
            return HTTPStatus.OK, {"state": login.state}

    # --- what the opener says ---------------------------------------------------------------

    def opened(self, url: str) -> tuple[int, dict[str, Any]]:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return HTTPStatus.BAD_REQUEST, {"error": "not an http(s) URL"}
        host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        with self._lock:
            login = self._login
            if login is None or login.state not in RUNNING:
                return HTTPStatus.CONFLICT, {"error": "no login is running"}
            login.auth_url_host = host
            if login.state == STARTING:
                login.state = WAITING
        self._emit(format_marker("agent", state=WAITING, provider=login.request.provider, auth_url_host=host))
        return HTTPStatus.OK, {"state": WAITING}

    # --- running one login ------------------------------------------------------------------

    def _prepare(self, directory: Path) -> None:
        self.config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700)
        if self.config.user.uid is not None:
            os.chown(directory, self.config.user.uid, self.config.user.gid or -1)

    def _environment(self, login: Login) -> dict[str, str]:
        user = self.config.user
        env = {"HOME": str(user.home), "USER": user.name, "LOGNAME": user.name, "PATH": self.config.path,
               "SHELL": "/bin/bash", "LANG": "C.UTF-8", "TERM": "xterm-256color", "DISPLAY": self.config.display}
        env.update(login.request.env)
        # The tool must open its page with our opener, whatever the request says.
        env["BROWSER"] = self.config.opener
        env["BROWSERVM_OPENER"] = str(self.config.run_dir / OPENER_FILE)
        return env

    def _argv(self, login: Login) -> list[str]:
        runner = [*self.config.toolrun, "--log", str(login.directory / rundir.OUTPUT_LOG),
                  "--status", str(login.directory / rundir.STATUS), "--pids", str(login.directory / rundir.PIDS)]
        for path in login.request.credentials:
            runner += ["--mkdir", str(Path(path).parent)]
        runner += ["--", *login.request.command]
        if self.config.terminal is None:
            return runner
        title = f"browservm: signing in to {login.request.provider}"
        return [self.config.terminal, "-title", title, "-geometry", "100x24+20+20", "-fa", "Monospace",
                "-fs", "11", "-e", *runner]

    def _supervise(self, login: Login) -> None:
        try:
            self._run(login)
        except Exception as exc:
            self._finish(login, FAILED, f"agent error: {type(exc).__name__}: {exc}")

    def _run(self, login: Login) -> None:
        request = login.request
        deadline = login.started + request.timeout_s
        if self.config.terminal is not None and not _wait_for_display(self.config.display, _DISPLAY_WAIT_S):
            self._finish(login, FAILED, f"the desktop's display {self.config.display} did not come up")
            return
        user = self.config.user
        # What an earlier login in this VM left is not this login's: the tool writes them anew. Removed
        # as the desktop user, so a link planted in its home can only point at what it may delete anyway.
        try:
            removed = subprocess.run(["rm", "-f", "--", *request.credentials], capture_output=True, text=True,
                                     timeout=_STOP_GRACE_S, check=False, user=user.uid, group=user.gid,
                                     extra_groups=[] if user.uid is not None else None)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self._finish(login, FAILED, f"cannot remove an earlier login's credentials: {exc}")
            return
        if removed.returncode != 0:
            self._finish(login, FAILED, f"cannot remove an earlier login's credentials: {removed.stderr.strip()}")
            return
        watch = CredentialsWatch(request.credentials)  # before the tool runs: no write can slip past it
        try:
            with open(login.directory / rundir.TERMINAL_LOG, "wb") as terminal_log:
                proc = subprocess.Popen(
                    self._argv(login), env=self._environment(login), cwd=user.home, stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=terminal_log, start_new_session=True, user=user.uid,
                    group=user.gid, extra_groups=[] if user.uid is not None else None)
        except OSError as exc:
            watch.close()
            self._finish(login, FAILED, f"cannot start {self._argv(login)[0]}: {exc.strerror}")
            return
        pidfd = os.pidfd_open(proc.pid)
        try:
            outcome = self._watch(login, proc, pidfd, watch, deadline)
            if outcome[0] == CAPTURED:
                # Let the tool finish on its own (it may still print or tidy up), then stop it.
                _wait_readable(pidfd, _CAPTURE_GRACE_S)
            self._stop(login, proc)
            if outcome[0] == CAPTURED:
                with self._lock:
                    login.exit_status = rundir.exit_status(login.directory)
                return
            if outcome[0] == FAILED and outcome[2] is None:
                outcome = (FAILED, outcome[1], rundir.exit_status(login.directory))
            self._finish(login, outcome[0], outcome[1], exit_status=outcome[2])
        finally:
            watch.close()
            os.close(pidfd)

    def _watch(self, login: Login, proc: subprocess.Popen[bytes], pidfd: int, watch: CredentialsWatch,
               deadline: float) -> tuple[str, str | None, int | None]:
        request = login.request
        while True:
            if login.cancel_requested:
                return CANCELLED, "cancelled by the controller", None
            found = self._check(login, watch)
            if found:
                return CAPTURED, None, None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return TIMED_OUT, f"no credentials within {request.timeout_s:g} s", None
            readable, _, _ = select.select([watch.fd, pidfd, login.wake[0]], [], [], remaining)
            if login.wake[0] in readable:
                _drain(login.wake[0])
            if watch.fd in readable:
                watch.drain()
            if pidfd in readable:
                proc.wait()
                if self._check(login, watch):
                    return CAPTURED, None, None
                status = rundir.exit_status(login.directory)
                if status is None:
                    return FAILED, (f"the terminal exited (status {proc.returncode}) before the tool "
                                    f"finished: {rundir.tail_text(login.directory / rundir.TERMINAL_LOG)}"), None
                missing = watch.problem or "the credentials are missing"
                return FAILED, f"the tool exited with status {status}; {missing}", status

    def _check(self, login: Login, watch: CredentialsWatch) -> bool:
        """Captured the moment the files are good: the state changes at once, the tool is stopped after."""
        files = watch.check(self.config.user.uid, login.request.required_keys)
        if files is None:
            return False
        digest = credentials_digest(files)
        with self._changed:
            if login.state not in RUNNING:
                return True
            login.files, login.digest, login.state = files, digest, CAPTURED
            self._changed.notify_all()
        self._emit(captured_marker(login.request.provider, len(files), digest))
        return True

    def _stop(self, login: Login, proc: subprocess.Popen[bytes]) -> None:
        """Kill the tool's process group, the runner's and the terminal's; wait for their end."""
        groups = [proc.pid, *rundir.pids(login.directory)]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [g for g in groups if _signal_group(g, sig)]
            if not alive:
                break
            end = time.monotonic() + _STOP_GRACE_S
            while alive and time.monotonic() < end:
                if proc.returncode is None:
                    proc.poll()
                alive = [g for g in alive if _group_alive(g)]
                if alive:
                    time.sleep(0.05)  # no pidfd exists for a whole process group
        if proc.returncode is None:
            proc.wait(timeout=_STOP_GRACE_S)

    def _finish(self, login: Login, state: str, reason: str | None, exit_status: int | None = None) -> None:
        with self._changed:
            if login.state not in RUNNING:
                return
            login.state, login.reason, login.exit_status = state, reason, exit_status
            login.files = None
            self._changed.notify_all()
        if state != CAPTURED:
            self._emit(format_marker("agent", state=state, provider=login.request.provider, exit_status=exit_status))

    def shutdown(self) -> None:
        with self._lock:
            login = self._login
            if login is None or login.state not in RUNNING:
                return
            login.cancel_requested = True
        _wake(login)


def _wait_for_display(display: str, timeout: float) -> bool:
    """Wait for the X server's socket; its directory is watched, so no polling interval matters."""
    number = display.lstrip(":").split(".")[0]
    sockets = Path("/tmp/.X11-unix")  # noqa: S108 - where every X server puts its socket
    target = sockets / f"X{number}"
    deadline = time.monotonic() + timeout
    while not target.exists():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        watch = CredentialsWatch([str(target)])
        try:
            if not target.exists():
                select.select([watch.fd], [], [], remaining)
        finally:
            watch.close()
    return True


def _wait_readable(fd: int, timeout: float) -> None:
    select.select([fd], [], [], timeout)


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wake(login: Login) -> None:
    with contextlib.suppress(OSError):  # already woken (the pipe is full), or the login is over
        os.write(login.wake[1], b"x")


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


def controller_server(agent: Agent, address: tuple[str, int]) -> Server:
    """The controller's API (contract in the module docstring)."""
    def login(body: Any) -> tuple[int, Mapping[str, Any]]:
        try:
            request = LoginRequest.parse(body, agent.config.user.home)
        except BadRequest as exc:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": str(exc)}
        return agent.login(request)

    routes: dict[tuple[str, str], Route] = {
        ("GET", "/v1/status"): lambda _: (HTTPStatus.OK, agent.status()),
        ("POST", "/v1/login"): login,
        ("POST", "/v1/handover"): lambda _: agent.handover(),
        ("POST", "/v1/cancel"): lambda _: agent.cancel(),
    }
    disk = agent.config.config_disk
    return Server(address, AgentKey(agent.config.secret, None if disk is None else lambda: read_secret(disk)), routes)


def opener_server(agent: Agent, port: int = OPENER_PORT) -> Server:
    """The opener's channel, on loopback only, with a token of its own."""
    def opened(body: Any) -> tuple[int, Mapping[str, Any]]:
        if not isinstance(body, dict) or not isinstance(body.get("url"), str) or len(body["url"]) > 16384:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": "send {\"url\": ...}"}
        return agent.opened(body["url"])

    return Server(("127.0.0.1", port), AgentKey(agent.opener_token), {("POST", "/v1/opened"): opened})


def write_opener_file(agent: Agent, server: Server) -> Path:
    """Where the opener finds the agent: root and the desktop user's group may read it, no one else."""
    run_dir = agent.config.run_dir
    run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    host, port = server.server_address[:2]
    document = json.dumps({"url": f"http://{host!s}:{port}/v1/opened", "token": agent.opener_token}).encode()
    target = run_dir / OPENER_FILE
    temporary = run_dir / (OPENER_FILE + ".new")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        if agent.config.user.gid is not None:
            os.fchown(fd, 0, agent.config.user.gid)
            os.fchmod(fd, 0o640)
        os.write(fd, document)
    finally:
        os.close(fd)
    os.replace(temporary, target)
    return target


def serve(config: AgentConfig, address: tuple[str, int], opener_port: int = OPENER_PORT,
          ready: Callable[[Server], None] | None = None) -> int:
    agent = Agent(config)
    api = controller_server(agent, address)
    opener = opener_server(agent, opener_port)
    write_opener_file(agent, opener)
    threading.Thread(target=opener.serve_forever, name="opener", daemon=True).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()
        threading.Thread(target=api.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(format_marker("ready", service="agent", state="ready", port=api.server_address[1]), flush=True)
    if ready is not None:
        ready(api)
    try:
        api.serve_forever()
    finally:
        agent.shutdown()
        opener.shutdown()
        api.server_close()
        opener.server_close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="browservm-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--config-disk", type=Path, default=configdisk.GUEST_DEVICE)
    parser.add_argument("--listen", default="0.0.0.0", help="address for the controller's API")  # noqa: S104
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--opener-port", type=int, default=OPENER_PORT)
    parser.add_argument("--user", default=DEFAULT_USER, help="the desktop user the tool runs as")
    parser.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    parser.add_argument("--terminal", default="xterm", help="the terminal program, or 'none' for no window")
    parser.add_argument("--display", default=DEFAULT_DISPLAY)
    parser.add_argument("--opener", default=str(BIN / "browservm-opener"))
    parser.add_argument("--toolrun", default=str(BIN / "browservm-toolrun"),
                        help="the runner, as words separated by spaces")
    args = parser.parse_args(argv)
    try:
        secret = read_secret(args.config_disk)
        user = DesktopUser.lookup(args.user)
    except (OSError, KeyError, configdisk.ConfigDiskError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(format_marker("agent", state="failed", reason=f"{args.config_disk}: {reason}"), flush=True)
        return 1
    config = AgentConfig(secret=secret, user=user, run_dir=args.run_dir, config_disk=args.config_disk,
                         terminal=None if args.terminal == "none" else args.terminal, display=args.display,
                         opener=args.opener, toolrun=tuple(args.toolrun.split()))
    try:
        return serve(config, (args.listen, args.port), args.opener_port)
    except OSError as exc:
        print(format_marker("agent", state="failed", reason=f"cannot listen: {exc.strerror}"), flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
