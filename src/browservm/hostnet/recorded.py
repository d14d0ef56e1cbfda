"""The host objects browservm created, in the store.

Each object is recorded *before* it is created, so a crash between the two leaves a record of an
object that may not exist (which `down` passes over), never an object of ours that nothing records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from browservm.errors import HostNetworkError
from browservm.store import Store


class HostRecords:
    def __init__(self, store: Store) -> None:
        self._store = store

    def add(self, kind: str, name: str, detail: str = "") -> None:
        with self._store.transaction() as db:
            db.execute("INSERT OR REPLACE INTO host_objects (kind, name, detail, created_at) VALUES (?, ?, ?, ?)",
                       (kind, name, detail, time.time()))

    def get(self, kind: str, name: str) -> str | None:
        rows = self._store.read("SELECT detail FROM host_objects WHERE kind = ? AND name = ?", (kind, name))
        return str(rows[0][0]) if rows else None

    def names(self, kind: str) -> list[str]:
        return [str(r[0]) for r in self._store.read("SELECT name FROM host_objects WHERE kind = ? ORDER BY name",
                                                    (kind,))]

    def remove(self, kind: str, name: str) -> None:
        with self._store.transaction() as db:
            db.execute("DELETE FROM host_objects WHERE kind = ? AND name = ?", (kind, name))

    @contextmanager
    def intent(self, kind: str, name: str, detail: str = "") -> Iterator[None]:
        """Record the object the block is about to create, before it creates it.

        If the block fails with HostNetworkError, the kernel or nft refused and
        nothing was created, so a record this call added is taken back (the name
        may be someone else's object that appeared in between). On anything else
        (an interrupt, a crash) the record stays: `down` tolerates an object that
        never got created, but could not find one that nothing records.
        """
        added = self.get(kind, name) is None
        if added:
            self.add(kind, name, detail)
        try:
            yield
        except HostNetworkError:
            if added:
                self.remove(kind, name)
            raise
