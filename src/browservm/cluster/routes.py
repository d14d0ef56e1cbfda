"""A front's cache of VM routes, kept right by PostgreSQL's LISTEN/NOTIFY.

Every change of a route is NOTIFYed in the transaction that makes it (record.py), so a
listener hears of it once it is committed and drops that VM's entry; the next lookup reads the
record again. Two things would let a stale route stay cached, and both are closed here:
- a notification that arrives while a lookup is reading: each invalidation bumps a counter, and a
  lookup's result is kept only when the counter did not move while it read;
- notifications missed while the listening connection was down: nothing is cached while it is,
  and the whole cache is dropped each time it connects again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from browservm.cluster.errors import RecordUnavailable
from browservm.cluster.record import Route
from browservm.cluster.schema import ROUTES

log = logging.getLogger(__name__)
_POLL = 0.25  # seconds between checks of the stop flag while no notification comes
_RECONNECT = 1.0  # seconds before listening again after the connection failed


class RouteCache:
    """Routes by VM id; `lookup` reads one from the record (Record.route) on a miss."""

    def __init__(self, conninfo: str, lookup: Callable[[str], Route], *, password: str | None = None) -> None:
        self._conninfo = conninfo
        self._password = password
        self._lookup = lookup
        self._routes: dict[str, Route] = {}
        self._invalidations = 0
        self._listening = False
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="route-cache", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start listening; returns once LISTEN is in place, so nothing cached from then on can go stale."""
        self._thread.start()
        with self._changed:
            listening = self._changed.wait_for(lambda: self._listening, timeout)
        if not listening:
            self.close()  # outside the lock: the listener takes it on its way out
            raise RecordUnavailable(self._conninfo, f"the route cache could not LISTEN on {ROUTES} within {timeout}s")

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def get(self, vm_id: str) -> Route:
        with self._changed:
            cached = self._routes.get(vm_id)
            seen = self._invalidations
        if cached is not None:
            return cached
        route = self._lookup(vm_id)
        with self._changed:
            if self._listening and self._invalidations == seen:
                self._routes[vm_id] = route
        return route

    def cached(self, vm_id: str) -> Route | None:
        with self._changed:
            return self._routes.get(vm_id)

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Wait for `condition` to hold, rechecked after each invalidation; False at the deadline."""
        with self._changed:
            return self._changed.wait_for(condition, timeout)

    def _invalidate(self, vm_id: str) -> None:
        with self._changed:
            self._invalidations += 1
            self._routes.pop(vm_id, None)
            self._changed.notify_all()

    def _set_listening(self, listening: bool) -> None:
        with self._changed:
            self._listening = listening
            self._invalidations += 1
            self._routes.clear()  # what changed while not listening is unknown
            self._changed.notify_all()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                conninfo = self._conninfo
                if self._password:
                    conninfo = psycopg.conninfo.make_conninfo(conninfo, password=self._password)
                with psycopg.connect(conninfo, autocommit=True) as connection:
                    connection.execute(f"LISTEN {ROUTES}")
                    self._set_listening(True)
                    while not self._stop.is_set():
                        for notification in connection.notifies(timeout=_POLL):
                            self._invalidate(notification.payload)
            except psycopg.Error as error:
                log.warning("route cache: listening on %s failed (%s); routes are read uncached until it is back",
                            ROUTES, error)
            self._set_listening(False)
            self._stop.wait(_RECONNECT)
