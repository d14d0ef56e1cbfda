"""Best of K: which host a new VM goes to, as a pure function of the hosts' loads.

E2B's shape (packages/api/internal/orchestrator/placement): sample K hosts at random, take the
least loaded, load = (allocated + pending) / capacity. Sampling instead of always taking the
global minimum keeps fronts that place at the same moment from all picking the same host; the
reservation (record.py) is what finally guards the host from overfilling.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from browservm.errors import InvalidInput

DEFAULT_K = 3


@dataclass(frozen=True)
class HostLoad:
    name: str
    capacity: int
    allocated: int
    pending: int

    @property
    def has_room(self) -> bool:
        return self.allocated + self.pending < self.capacity


def score(host: HostLoad) -> float:
    """The share of the host taken or being taken; lower is better. Called only on hosts with room."""
    return (host.allocated + host.pending) / host.capacity


def choose(hosts: Sequence[HostLoad], rng: random.Random, *, k: int = DEFAULT_K,
           exclude: Collection[str] = ()) -> HostLoad | None:
    """The best of `k` hosts sampled among those with room and not excluded; None when there is none."""
    if k < 1:
        raise InvalidInput("k", k, "must be at least 1")
    eligible = [host for host in hosts if host.has_room and host.name not in exclude]
    sample = rng.sample(eligible, min(k, len(eligible)))
    # Ties go to the name so a run with a seeded rng is reproducible.
    return min(sample, key=lambda host: (score(host), host.name), default=None)
