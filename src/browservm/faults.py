"""Crash points: where a fault-injection test may kill browservm as a power cut or `kill -9` would.

Every place where a crash could leave something half-done (a TAP made but not
yet labelled, a VMM started but its PID not yet recorded, a host object made
but not yet recorded) calls `crash_point(NAME)`. When the environment variable
BROWSERVM_CRASH_AT names that point, the process sends itself SIGKILL there:
no cleanup handler, no `finally`, exactly like a real crash. The tests then
check that the next `serve` or `vm rm` cleans up or adopts what was left.
"""

from __future__ import annotations

import os
import signal

ENV = "BROWSERVM_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
