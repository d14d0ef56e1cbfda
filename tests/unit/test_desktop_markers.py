"""The desktop hops read the guest's markers: a part that never starts fails at once, not at the deadline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from browservm.errors import ProbeFailed
from browservm.guest.markers import format_marker
from browservm.vm.console import ConsoleLog
from browservm.vm.desktop_path import desktop_path
from browservm.vm.readiness import wait_desktop_complete, wait_desktop_ready


def console_with(tmp_path: Path, *markers: str) -> ConsoleLog:
    path = tmp_path / "console.log"
    path.write_text("".join(m + "\n" for m in markers))
    return ConsoleLog(path)


def test_a_desktop_ready_without_websockify_fails_desktop_ready_at_once(tmp_path: Path) -> None:
    console = console_with(tmp_path, format_marker("ready", service="x11vnc", state="ready"),
                           format_marker("ready", service="desktop", state="ready", services="xvfb,openbox,x11vnc"))
    started = time.monotonic()
    with pytest.raises(ProbeFailed) as failed:
        asyncio.run(wait_desktop_ready(console, timeout=30, listeners=("websockify",)))
    assert time.monotonic() - started < 5
    assert failed.value.hop == "desktop.ready"
    assert "without websockify (it started xvfb, openbox, x11vnc)" in failed.value.reason


def test_the_usual_order_passes_both_hops(tmp_path: Path) -> None:
    console = console_with(tmp_path, format_marker("ready", service="websockify", state="ready", port=6080),
                           format_marker("ready", service="desktop", state="ready", services="xvfb,websockify"))
    asyncio.run(wait_desktop_ready(console, timeout=5, listeners=("websockify",)))
    asyncio.run(wait_desktop_complete(console, timeout=5))


@pytest.mark.parametrize("server", ["xvnc", "x11vnc"])
def test_the_rfb_path_is_ready_with_whichever_vnc_server_the_image_runs(tmp_path: Path, server: str) -> None:
    console = console_with(tmp_path, format_marker("ready", service=server, state="ready", port=5901),
                           format_marker("ready", service="desktop", state="ready", services=f"{server},openbox"))
    asyncio.run(wait_desktop_ready(console, timeout=5, listeners=desktop_path("rfb").listeners))


def test_a_desktop_without_a_vnc_server_fails_the_rfb_paths_desktop_ready(tmp_path: Path) -> None:
    console = console_with(tmp_path, format_marker("ready", service="desktop", state="ready",
                                                   services="openbox,websockify"))
    with pytest.raises(ProbeFailed) as failed:
        asyncio.run(wait_desktop_ready(console, timeout=30, listeners=desktop_path("rfb").listeners))
    assert "without xvnc or x11vnc (it started openbox, websockify)" in failed.value.reason
