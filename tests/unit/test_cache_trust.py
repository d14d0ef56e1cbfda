"""Root boots what is in the image cache: it is used only if no other user can change it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from browservm.progress import UntrustedCache, cache_dir, check_trusted

NOBODY = 65534


def test_a_cache_only_we_control_is_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "browservm" / "images"
    cache.mkdir(parents=True)
    check_trusted(cache)  # /tmp above it is shared, but sticky: fine
    check_trusted(tmp_path / "not-yet" / "made")  # what does not exist yet is made by us


def test_a_directory_writable_by_others_anywhere_above_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    (shared / "browservm" / "images").mkdir(parents=True)
    shared.chmod(0o777)
    with pytest.raises(UntrustedCache) as refused:
        check_trusted(shared / "browservm" / "images")
    assert refused.value.directory == shared and "writable by others (mode 0777)" in refused.value.reason


def test_a_directory_another_user_owns_is_refused_also_behind_a_link(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    (tmp_path / "link").symlink_to(theirs)
    with pytest.raises(UntrustedCache, match=f"owned by uid {NOBODY}"):
        check_trusted(tmp_path / "link" / "images")


def test_xdg_cache_home_is_checked_before_it_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir("images") == tmp_path / "browservm" / "images"
    tmp_path.chmod(0o775)
    with pytest.raises(UntrustedCache, match="XDG_CACHE_HOME"):
        cache_dir("images")
