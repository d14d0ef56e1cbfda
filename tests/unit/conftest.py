"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .fakes import Parts, make_parts, stop_all


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    """A manager's parts with the fake VMM; every fake VMM is killed afterwards, even on failure."""
    made = make_parts(tmp_path)
    try:
        yield made
    finally:
        stop_all(made)
