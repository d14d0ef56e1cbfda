"""A VM's disk is cloned sparse, also onto another file system than the image cache's."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from browservm.images.disk import allocated_bytes, clone_sparse


def _template(path: Path) -> bytes:
    data = os.urandom(64 * 1024)
    with path.open("wb") as stream:
        stream.truncate(64 * 2**20)  # mostly a hole, as an empty ext4 image is
        stream.seek(8 * 2**20)
        stream.write(data)
    return data


def test_a_clone_keeps_the_data_and_the_holes(tmp_path: Path) -> None:
    data = _template(tmp_path / "template")
    clone_sparse(tmp_path / "template", tmp_path / "clone")
    assert (tmp_path / "clone").read_bytes() == (tmp_path / "template").read_bytes()
    assert allocated_bytes(tmp_path / "clone") < 2**20 and data


_SHM_ELSEWHERE = Path("/dev/shm").is_dir() and os.stat("/dev/shm").st_dev != os.stat(tempfile.gettempdir()).st_dev


@pytest.mark.skipif(not _SHM_ELSEWHERE,
                    reason="needs /dev/shm on another file system than the temporary directory")
def test_a_clone_onto_another_file_system_works(tmp_path: Path) -> None:
    # copy_file_range refuses to cross file systems (EXDEV): the state directory and the image
    # cache are often on different ones.
    _template(tmp_path / "template")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        clone = Path(other) / "clone"
        clone_sparse(tmp_path / "template", clone)
        assert clone.read_bytes() == (tmp_path / "template").read_bytes()
        assert allocated_bytes(clone) < 2**20
