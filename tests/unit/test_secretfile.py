"""Root reads its keys only from files no other local user could have chosen (issue 18 #6): never
through a link, never from a state directory another user owns or can write."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from browservm.api.keys import API_KEY_FILE, SIGNING_KEY_FILE, api_key, signing_key
from browservm.cli import client
from browservm.config import load_settings
from browservm.controller import ServeLock
from browservm.errors import StateError
from browservm.oauth import vault
from browservm.secretfile import check_state_dir, read_or_create
from browservm.store import Store

NOBODY = 65534
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: files of another user are made with chown")


def victim(tmp_path: Path) -> Path:
    """A file of root's that a key file could be pointed at."""
    target = tmp_path / "roots-own-file"
    target.write_text("root's secret\n")
    target.chmod(0o644)
    return target


def untouched(target: Path) -> bool:
    return stat.S_IMODE(target.stat().st_mode) == 0o644 and target.read_text() == "root's secret\n"


@as_root
def test_the_reported_attack_a_state_directory_of_another_user_with_a_linked_key_is_refused(tmp_path: Path) -> None:
    """As nobody: a state directory in a world-writable place, api.key linked to a root file; root
    then read that file as its key and chmodded it 0600."""
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o1777)  # like /tmp
    state = world / "state"
    state.mkdir()
    target = victim(tmp_path)
    (state / API_KEY_FILE).symlink_to(target)
    os.chown(state, NOBODY, NOBODY)
    os.lchown(state / API_KEY_FILE, NOBODY, NOBODY)
    loads: list[Callable[[], object]] = [lambda: api_key(state), lambda: signing_key(state),
                                         lambda: vault.load_key(state), lambda: Store(state / "browservm.db"),
                                         lambda: ServeLock(state).__enter__()]
    for load in loads:
        with pytest.raises(StateError, match=f"owned by uid {NOBODY}, another user"):
            load()
    assert untouched(target) and sorted(os.listdir(state)) == [API_KEY_FILE]


@pytest.mark.parametrize("name", [API_KEY_FILE, SIGNING_KEY_FILE, vault.KEY_FILE])
def test_a_key_file_that_is_a_link_is_refused_even_in_our_own_directory(tmp_path: Path, name: str) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = victim(tmp_path)
    (state / name).symlink_to(target)
    with pytest.raises(StateError, match="is a symbolic link"):
        if name == API_KEY_FILE:
            api_key(state)
        elif name == SIGNING_KEY_FILE:
            signing_key(state)
        else:
            vault.load_key(state)
    assert untouched(target)


def test_the_serve_lock_is_never_written_through_a_link(tmp_path: Path) -> None:
    """Root truncates the lock and writes its PID there: through a link, any file of the host."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = victim(tmp_path)
    (state / "serve.lock").symlink_to(target)
    with pytest.raises(StateError, match="cannot open the serve lock"):
        ServeLock(state).__enter__()
    assert untouched(target)


def test_the_clients_key_is_never_read_through_a_link(tmp_path: Path) -> None:
    """`vm ... --url` sends the key it reads to the URL given: a link would send any file there."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / API_KEY_FILE).symlink_to(victim(tmp_path))
    with pytest.raises(StateError, match="is a symbolic link"):
        client.api_key(load_settings(state_dir=state))
    (state / API_KEY_FILE).unlink()
    (state / API_KEY_FILE).write_text("the-key\n")
    assert client.api_key(load_settings(state_dir=state)) == ("the-key", str(state / API_KEY_FILE))


def test_a_link_to_a_missing_file_is_not_followed_to_make_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / API_KEY_FILE).symlink_to(tmp_path / "made-through-the-link")
    with pytest.raises(StateError):
        api_key(state)
    assert not (tmp_path / "made-through-the-link").exists()


def test_a_state_directory_or_one_above_writable_by_others_is_refused_but_a_sticky_parent_is_fine(
        tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    state = shared / "state"
    state.mkdir(parents=True, mode=0o700)
    shared.chmod(0o777)
    with pytest.raises(StateError, match=r"shared is writable by other users \(mode 0777\)"):
        api_key(state)
    shared.chmod(0o1777)  # sticky, as /tmp: others cannot replace what is ours in it
    made = api_key(state)[0]
    assert len(made) > 30 and stat.S_IMODE((state / API_KEY_FILE).stat().st_mode) == 0o600
    state.chmod(0o1777)  # the state directory itself: writable by others is refused, sticky or not
    with pytest.raises(StateError, match=r"state is writable by other users \(mode 1777\)"):
        check_state_dir(state)
    with pytest.raises(StateError, match="writable by other users"):
        Store(state / "browservm.db")


@as_root
def test_a_key_file_of_another_user_or_with_two_names_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    theirs = state / API_KEY_FILE
    theirs.write_text("their key\n")
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(StateError, match=f"owned by uid {NOBODY}, not by us"):
        api_key(state)
    theirs.unlink()
    target = victim(tmp_path)
    os.link(target, state / API_KEY_FILE)
    with pytest.raises(StateError, match="has 2 names"):
        api_key(state)
    assert untouched(target)


def test_a_fifo_in_place_of_a_key_is_refused_at_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    os.mkfifo(state / vault.KEY_FILE)
    with pytest.raises(StateError, match="not a regular file"):
        vault.load_key(state)


def test_a_key_readable_by_others_is_made_ours_alone_and_a_key_is_made_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = read_or_create(state / "some.key", "made-first", "a key")
    assert first == "made-first\n" and stat.S_IMODE(state.stat().st_mode) == 0o700
    (state / "some.key").chmod(0o644)
    assert read_or_create(state / "some.key", "made-second", "a key") == "made-first\n"
    assert stat.S_IMODE((state / "some.key").stat().st_mode) == 0o600
