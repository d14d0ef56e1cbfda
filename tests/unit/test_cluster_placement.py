"""Best of K (browservm.cluster.placement): which host a new VM goes to."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from browservm.cluster.placement import HostLoad, choose, score
from browservm.errors import InvalidInput


def test_score_counts_pending_reservations_as_taken() -> None:
    assert score(HostLoad("a", capacity=10, allocated=3, pending=2)) == 0.5


def test_with_k_covering_every_host_the_least_loaded_wins() -> None:
    hosts = [HostLoad("a", 10, 5, 0), HostLoad("b", 100, 20, 10), HostLoad("c", 4, 1, 1)]
    chosen = choose(hosts, random.Random(1), k=3)
    assert chosen is not None and chosen.name == "b"  # 0.3 against 0.5 and 0.5


def test_full_and_excluded_hosts_are_never_chosen() -> None:
    hosts = [HostLoad("full", 2, 1, 1), HostLoad("empty", 0, 0, 0), HostLoad("tried", 10, 0, 0),
             HostLoad("busy", 10, 9, 0)]
    rng = random.Random(7)
    picks = {choose(hosts, rng, k=1, exclude={"tried"}) for _ in range(50)}
    assert picks == {HostLoad("busy", 10, 9, 0)}


def test_none_when_no_host_has_room() -> None:
    assert choose([HostLoad("full", 1, 1, 0)], random.Random(1)) is None
    assert choose([], random.Random(1)) is None


def test_k_below_one_is_refused_naming_k() -> None:
    with pytest.raises(InvalidInput) as refused:
        choose([HostLoad("a", 1, 0, 0)], random.Random(1), k=0)
    assert refused.value.field == "k"


def test_sampling_spreads_ties_over_the_hosts() -> None:
    # k=1 is a uniform pick: every equally loaded host gets a share, not the first one every time.
    hosts = [HostLoad(name, 10, 0, 0) for name in "abcd"]
    rng = random.Random(3)
    counts = Counter(chosen.name for _ in range(400) if (chosen := choose(hosts, rng, k=1)) is not None)
    assert set(counts) == set("abcd") and min(counts.values()) > 50


loads = st.builds(HostLoad, name=st.text("abcdefgh", min_size=1, max_size=3), capacity=st.integers(0, 20),
                  allocated=st.integers(0, 20), pending=st.integers(0, 5))


@given(st.lists(loads, max_size=8, unique_by=lambda h: h.name), st.integers(1, 10), st.integers(0, 2**32))
def test_the_choice_has_room_and_is_the_best_of_a_sample(hosts: list[HostLoad], k: int, seed: int) -> None:
    chosen = choose(hosts, random.Random(seed), k=k)
    with_room = [h for h in hosts if h.has_room]
    if not with_room:
        assert chosen is None
        return
    assert chosen is not None and chosen.has_room
    # Every host better than the best of the sample was left out of it: at most n - k of them.
    better = sum(1 for h in with_room if score(h) < score(chosen))
    assert better <= len(with_room) - min(k, len(with_room))
