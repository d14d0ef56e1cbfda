"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .fakes import FakeNetwork, Parts, make_parts, stop_all
from .test_api import Served, serve_fakes


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    """A manager's parts with the fake VMM; every fake VMM is killed afterwards, even on failure."""
    made = make_parts(tmp_path)
    try:
        yield made
    finally:
        stop_all(made)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Makes a served controller with the fake VMM (test_api.py's harness; settings as keyword arguments);
    every VMM it started is stopped at the end."""
    made: list[Served] = []

    def make(network: FakeNetwork | None = None, **settings: object) -> Served:
        made.append(serve_fakes(tmp_path / f"state{len(made)}", network, **settings))
        return made[-1]

    yield make
    for served in made:
        stop_all(served.parts)
