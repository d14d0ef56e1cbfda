"""A QMP session on a QEMU's control socket: commands, events, and file descriptors handed over.

`Qmp` is blocking (call it in a thread); `wait_guest_stopped` is the one asynchronous session.
What QEMU says is bounded before it is parsed (a guest that took
over its QEMU could otherwise make the controller read without end): one message is at most
MAX_MESSAGE bytes, and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from browservm.inotify import wait_for_file

MAX_MESSAGE = 1 << 20


class QmpError(Exception):
    """QEMU refused a command, went away, or did not answer in time; the message says which."""


class Qmp:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self._path = path
        self._timeout = timeout
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._buffer = b""
        self.events: list[dict[str, Any]] = []  # received while waiting for something else

    def __enter__(self) -> Qmp:
        try:
            self._connect(time.monotonic() + self._timeout)
            greeting = self._read(time.monotonic() + self._timeout)
            if "QMP" not in greeting:
                raise QmpError(f"{self._path} did not greet as QMP")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise
        return self

    def _connect(self, deadline: float) -> None:
        """QEMU makes the socket's file at bind() and listens just after: a VMM descheduled between the
        two refuses a connection (two restored clones at once on 2 cores did). Nothing signals the
        listen, so a refusal is tried again, briefly, until `deadline`; then it is the answer."""
        while True:
            self._sock.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                self._sock.connect(str(self._path))
                self._sock.settimeout(self._timeout)
                return
            except ConnectionRefusedError:
                if time.monotonic() >= deadline:
                    raise
            self._sock.close()
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            time.sleep(0.01)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *, fds: tuple[int, ...] = ()) -> Any:
        """Run `command`; its return value. `fds` travel with it (SCM_RIGHTS), for `getfd`."""
        message = json.dumps({"execute": command, **({"arguments": arguments} if arguments else {})}).encode()
        try:
            if fds:
                socket.send_fds(self._sock, [message], list(fds))
            else:
                self._sock.sendall(message)
        except OSError as exc:
            raise QmpError(f"{command}: cannot reach QEMU: {exc.strerror or exc}") from None
        deadline = time.monotonic() + self._timeout
        while True:
            reply = self._read(deadline)
            if "event" in reply:
                self.events.append(reply)
            elif "error" in reply:
                error = reply["error"]
                raise QmpError(f"{command}: {error.get('desc', error) if isinstance(error, dict) else error}")
            elif "return" in reply:
                return reply["return"]

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The next event `name` whose data has the given fields (one already received counts)."""
        def matches(event: dict[str, Any]) -> bool:
            return event.get("event") == name and all(event.get("data", {}).get(k) == v for k, v in data.items())
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if matches(event):
                    self.events.remove(event)
                    return event
            reply = self._read(deadline, f"waiting for {name}")
            if "event" in reply:
                self.events.append(reply)

    def _read(self, deadline: float, what: str = "waiting for an answer") -> dict[str, Any]:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QmpError(f"QEMU did not answer within the deadline ({what})")
            if len(self._buffer) > MAX_MESSAGE:
                raise QmpError(f"QEMU sent a message over {MAX_MESSAGE} bytes ({what})")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise QmpError(f"the connection to QEMU failed ({what}): {exc.strerror or exc}") from None
            if not chunk:
                raise QmpError(f"QEMU closed its control socket ({what})")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            message = json.loads(line)
        except ValueError:
            raise QmpError(f"QEMU sent something that is not JSON ({what})") from None
        if not isinstance(message, dict):
            raise QmpError(f"QEMU sent a JSON value that is not an object ({what})")
        return message


# QMP events that mean QEMU no longer runs its guest although it lives on: a KVM internal error
# (QEMU stops the VM and says why on its stderr), an I/O error policy, a panicked guest kept paused.
STOP_EVENTS = ("STOP", "GUEST_PANICKED")


async def wait_guest_stopped(path: Path, appear: float = 10.0) -> str:
    """Hold a QMP session on `path` and return, in QEMU's words, once QEMU stops running its guest
    (awaited, not polled: QEMU sends an event). Never returns while the guest runs; QmpError when
    QEMU's socket does not appear within `appear` seconds or the session breaks (the VMM exited).

    It holds QEMU's only QMP session while it waits: nothing else may need QMP meanwhile.
    """
    if not await asyncio.to_thread(wait_for_file, path, appear):
        raise QmpError(f"QEMU made no control socket {path} within {appear:g} s")
    try:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=MAX_MESSAGE)
    except OSError as exc:
        raise QmpError(f"cannot reach QEMU at {path}: {exc.strerror or exc}") from None
    try:
        await _next_message(reader)  # the greeting
        writer.write(b'{"execute": "qmp_capabilities"}\n')
        while True:
            message = await _next_message(reader)
            if message.get("event") in STOP_EVENTS:
                break
        event = str(message["event"])
        writer.write(b'{"execute": "query-status"}\n')
        while "return" not in (reply := await _next_message(reader)):
            pass
        status = reply["return"].get("status", "?") if isinstance(reply["return"], dict) else "?"
        return f"QEMU stopped running the guest (QMP event {event}, status {str(status)[:40]!r})"
    finally:
        writer.close()


async def _next_message(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        raise QmpError(f"QEMU sent a message over {MAX_MESSAGE} bytes") from None
    except OSError as exc:
        raise QmpError(f"the connection to QEMU failed: {exc.strerror or exc}") from None
    if not line:
        raise QmpError("QEMU closed its control socket")
    try:
        message = json.loads(line)
    except ValueError:
        raise QmpError("QEMU sent something that is not JSON") from None
    if not isinstance(message, dict):
        raise QmpError("QEMU sent a JSON value that is not an object")
    return message
