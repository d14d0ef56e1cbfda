"""Running programs to completion, with their exit status always checked.

Every program browservm runs (tar, make, dpkg-query, zstd, ...) goes through a
`CommandRunner`, so a failure always becomes a `CommandFailed` that names the
command, its status and the end of what it printed, never a silent non-zero exit.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from browservm.errors import CommandFailed

TAIL_LINES = 25


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def _log_tail(log: Path, lines: int = TAIL_LINES) -> str:
    # A build log can be hundreds of megabytes: read only its end.
    with log.open("rb") as stream:
        stream.seek(0, os.SEEK_END)
        stream.seek(max(0, stream.tell() - 64 * 1024))
        return tail(stream.read().decode(errors="replace"), lines)


class CommandRunner:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self._env = dict(os.environ if env is None else env)

    def output(self, argv: Sequence[str], *, input: bytes | None = None, cwd: Path | None = None) -> bytes:
        """Run `argv`, feed it `input`, return what it wrote to stdout."""
        command = shlex.join(argv)
        try:
            done = subprocess.run(list(argv), input=input, capture_output=True, cwd=cwd, env=self._env,
                                  check=False)
        except FileNotFoundError:
            raise CommandFailed(command, f"program {argv[0]!r} not found: scripts/install.sh installs it") from None
        if done.returncode != 0:
            raise CommandFailed(command, f"exited with status {done.returncode}", returncode=done.returncode,
                                detail=tail(done.stderr.decode(errors="replace")))
        return done.stdout

    def logged(self, argv: Sequence[str], *, log: Path, cwd: Path | None = None,
               env: Mapping[str, str] | None = None) -> None:
        """Run `argv` with stdout and stderr appended to `log` (long builds: keep it all, show the end)."""
        command = shlex.join(argv)
        with log.open("ab") as stream:
            stream.write(f"\n$ {command}\n".encode())
            stream.flush()
            try:
                done = subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT,
                                      cwd=cwd, env={**self._env, **(env or {})}, check=False)
            except FileNotFoundError:
                raise CommandFailed(command, f"program {argv[0]!r} not found: scripts/install.sh installs it",
                                    log=str(log)) from None
        if done.returncode != 0:
            raise CommandFailed(command, f"exited with status {done.returncode}", returncode=done.returncode,
                                log=str(log), detail=_log_tail(log))
