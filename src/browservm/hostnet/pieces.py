"""What `host up`, `host down` and `host status` say of each piece of the host network."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Change:
    """What `up()` or `down()` did to one piece: created, updated, unchanged, removed, kept."""

    piece: str
    action: str
    detail: str = ""


@dataclass(frozen=True)
class Check:
    """One piece as `status()` found it."""

    piece: str
    ok: bool
    detail: str


def removed(present: bool) -> tuple[str, str]:
    """How `down` reports a recorded object: removed, or never created (an interrupted `up`)."""
    return ("removed", "") if present else ("unchanged", "not present")
