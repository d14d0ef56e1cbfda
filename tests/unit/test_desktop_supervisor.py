"""The desktop supervisor names the part that ended the desktop, whatever order the exits are heard in.
(The real parts, killed for real: tests/integration/test_desktop_real.py.)"""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from browservm.guest.desktop import Desktop, DesktopConfig
from browservm.guest.markers import parse_marker


class Part:
    """A child process whose exit the test decides."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self.ended)


def exits(out: str) -> list[tuple[str, str]]:
    markers = [parse_marker(line) for line in out.splitlines()]
    return [(m[1]["service"], m[1]["code"]) for m in markers if m and m[1].get("state") == "exited"]


async def supervise_while(exit_in_turn: list[tuple[str, int]], services: tuple[str, ...]) -> None:
    desktop = Desktop(DesktopConfig(services=services))
    parts = {name: Part() for name in services}
    desktop.children = cast(dict[str, asyncio.subprocess.Process], parts)
    supervising = asyncio.create_task(desktop._supervise())
    for name, code in exit_in_turn:
        await asyncio.sleep(0.05)  # the order the event loop hears of them, not a condition
        parts[name].ended.set_result(code)
    await asyncio.wait_for(supervising, 5)


def test_the_x_server_heard_of_after_the_window_manager_it_took_down_is_named_first(
        capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(supervise_while([("openbox", 1), ("xvnc", -9)], ("xvnc", "openbox", "websockify")))
    assert exits(capsys.readouterr().out) == [("xvnc", "-9"), ("openbox", "1")]


def test_a_part_that_ends_alone_is_the_only_one_named(capsys: pytest.CaptureFixture[str]) -> None:
    asyncio.run(supervise_while([("websockify", 2)], ("xvnc", "openbox", "websockify")))
    assert exits(capsys.readouterr().out) == [("websockify", "2")]
