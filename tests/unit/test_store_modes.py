"""The state directory and everything SQLite keeps in it are the owner's alone, whatever was there before."""

from __future__ import annotations

import stat
from pathlib import Path

from browservm.store import Store


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_state_directory_and_the_database_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)  # as a careless earlier set-up might have left it
    database = state / "state.sqlite3"
    with Store(database) as store, store.transaction() as db:
        db.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')")
    database.chmod(0o644)
    with Store(database):
        files = [database, state / "state.sqlite3-wal", state / "state.sqlite3-shm"]
        assert _mode(state) == 0o700
        assert {f.name: _mode(f) for f in files if f.exists()} == {f.name: 0o600 for f in files if f.exists()}
        assert (state / "state.sqlite3-wal").exists()  # so the check above covered SQLite's own files
