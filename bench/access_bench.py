"""What auth, audit and quotas add per request, and the audit trail's write throughput under a burst.

Run: .venv/bin/python bench/access_bench.py [--runs 150] [--batches 2]   (about 50 s)

One controller on the unit tests' fakes (tests/unit/fakes.py: TAPs as a set, every hop passing at
once, a real `sleep` process as the VMM), served by uvicorn over 127.0.0.1, with the audit trail's
group-commit writer running on the server's loop as `serve` runs it. Two ways, switched in-process
between requests so both run on the same app, store and VMs:

    real      a tenant key (a SQLite read by its digest), the tenant's quota counted in the insert
              transaction, every change recorded in the audit trail (committed after the answer)
    stubbed   a fixed admin principal (no lookup), the operator's own VMs (no quota), a no-op trail

1. Per request: POST /v1/vms?wait=true, GET /v1/vms/{id}, DELETE /v1/vms/{id}, the two ways
   alternated run by run (and their order flipped every run) so the machine's noise hits both alike.
   What is added is the median of the paired differences. Target: <= 1 ms per request.
2. Audit throughput: 200 concurrent POST /v1/vms?wait=true (httpx.AsyncClient), real trail vs no-op
   trail (the same tenant key and quota both ways), then 200 concurrent DELETEs: the burst's wall time
   until every answer is in and every entry committed, entries written, entries/s, the commits the
   group commit used, this process's CPU time. Target: the trail makes the burst at most 10% slower
   (the fastest burst each way: on a shared 2-core machine another process's load adds seconds to
   one burst or the other; each round's pair is shown).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import Request
from starlette.datastructures import State

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the fakes live with the unit tests

from browservm.access.audit import AuditEntry, AuditTrail
from browservm.access.principal import Principal, Role
from browservm.access.quotas import Quota
from browservm.api.app import build_app
from browservm.api.auth import Access
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.store import Store
from browservm.vm.parts import Limits
from tests.unit.fakes import make_parts, stop_all

TARGET_ADDED_MS = 1.0
TARGET_BATCH_RATIO = 1.10
BURST = 200
TENANT = "bench"
_SETTLE_S = 30.0  # how long an audit entry may take to be committed before the bench gives up

Record = Callable[[AuditEntry], Coroutine[Any, Any, None]]


class FixedAdmin:
    """The stubbed auth: every request is the same admin, found without any lookup."""

    def __init__(self) -> None:
        self._principal = Principal("bench", "bench", Role.ADMIN, "")

    def principal(self, request: Request) -> Principal:
        request.state.principal = self._principal  # as Access.principal notes it, for the audit middleware
        return self._principal


async def _no_record(entry: AuditEntry) -> None:
    return None


class Recorded:
    """Counts the audit middleware's records as they return (each after its entry is committed), so the bench
    can wait for a request's entry instead of guessing: the middleware records after the answer is sent."""

    def __init__(self) -> None:
        self.done = 0
        self._changed = threading.Condition()

    def wrap(self, record: Record) -> Record:
        async def counted(entry: AuditEntry) -> None:
            try:
                await record(entry)
            finally:
                with self._changed:
                    self.done += 1
                    self._changed.notify_all()
        return counted

    def wait_for(self, count: int) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.done >= count, timeout=_SETTLE_S):
                raise TimeoutError(f"only {self.done} of {count} audit records returned within {_SETTLE_S:g} s")


@dataclass
class Commits:
    """The trail's group commits: how many, how many entries, how long inside them."""

    calls: int = 0
    entries: int = 0
    seconds: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def wrap(self, write: Callable[[list[AuditEntry]], None]) -> Callable[[list[AuditEntry]], None]:
        def counted(entries: list[AuditEntry]) -> None:
            start = time.perf_counter()
            write(entries)
            with self._lock:
                self.calls += 1
                self.entries += len(entries)
                self.seconds += time.perf_counter() - start
        return counted

    def reset(self) -> None:
        with self._lock:
            self.calls, self.entries, self.seconds = 0, 0, 0.0


class Bench:
    def __init__(self, service: ControllerService, app_state: State, store: Store, url: str, key: str) -> None:
        self.trail: AuditTrail = service.audit
        self.app_state = app_state  # whose `access` the `caller` dependency reads
        self.store = store
        self._real_access: Access = service.access
        self._real_record = service.audit.record
        self._stub_access = FixedAdmin()
        self.recorded = Recorded()
        self.url = url
        self.headers = {"Authorization": f"Bearer {key}"}  # sent both ways: the same bytes on the wire

    @contextmanager
    def way(self, *, real_auth: bool, real_trail: bool) -> Iterator[None]:
        """Run the requests inside with the real key ring or the fixed admin, the real trail or the no-op one.
        Switched between requests only, with none in flight."""
        self.app_state.access = self._real_access if real_auth else self._stub_access
        record = self.recorded.wrap(self._real_record if real_trail else _no_record)
        self.trail.record = record  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            self.app_state.access = self._real_access
            self.trail.record = self._real_record  # type: ignore[method-assign]


@dataclass
class Cycle:
    post: float
    get: float
    delete: float
    post_committed: float  # the POST's answer until its audit entry is committed
    delete_committed: float

    @property
    def total(self) -> float:
        return self.post + self.get + self.delete


def _cycle(bench: Bench, client: httpx.Client, real: bool) -> Cycle:
    with bench.way(real_auth=real, real_trail=real):  # the stubbed admin's VMs are the operator's: no quota
        expected = bench.recorded.done + 1
        start = time.perf_counter()
        response = client.post("/v1/vms", params={"wait": "true"}, json={"user": "bench"})
        post = time.perf_counter() - start
        assert response.status_code == 200 and response.json()["state"] == "ready", response.text
        bench.recorded.wait_for(expected)
        post_committed = time.perf_counter() - start
        vm_id = response.json()["vm_id"]
        assert response.json()["tenant"] == (TENANT if real else ""), response.text
        start = time.perf_counter()
        response = client.get(f"/v1/vms/{vm_id}")
        get = time.perf_counter() - start
        assert response.status_code == 200, response.text
        start = time.perf_counter()
        response = client.delete(f"/v1/vms/{vm_id}")
        delete = time.perf_counter() - start
        assert response.status_code == 200 and response.json()["removed"] is True, response.text
        bench.recorded.wait_for(expected + 1)
        delete_committed = time.perf_counter() - start
    return Cycle(post, get, delete, post_committed, delete_committed)


@dataclass
class Batch:
    answers: float  # the first request out until the last answer in
    wall: float  # ... until the last audit entry is committed
    cpu: float  # this process's CPU time meanwhile (server and client: less swayed by the machine's other load)
    entries: int  # rows the audit table gained
    commits: int
    write_s: float  # time inside the trail's commits
    deletes: float = 0.0  # then 200 concurrent DELETEs, until their entries are committed


async def _burst(bench: Bench, real: bool, commits: Commits) -> Batch:
    with bench.way(real_auth=True, real_trail=real):  # only the trail differs: the same key and quota both ways
        before = _audit_rows(bench.store)
        commits.reset()
        expected = bench.recorded.done + BURST
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(base_url=bench.url, headers=bench.headers, trust_env=False, limits=limits,
                                     timeout=120.0) as client:
            start, cpu = time.perf_counter(), time.process_time()
            responses = await asyncio.gather(*(client.post("/v1/vms", params={"wait": "true"},
                                                           json={"user": f"u{n}"}) for n in range(BURST)))
            answers = time.perf_counter() - start
            await asyncio.to_thread(bench.recorded.wait_for, expected)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            refused = [r.text for r in responses if r.status_code != 200 or r.json()["state"] != "ready"]
            assert not refused, f"{len(refused)} of {BURST} creates not ready: {refused[0]}"
            batch = Batch(answers, wall, cpu, _audit_rows(bench.store) - before, commits.calls, commits.seconds)
            start = time.perf_counter()
            deleted = await asyncio.gather(*(client.delete(f"/v1/vms/{r.json()['vm_id']}") for r in responses))
            assert all(r.status_code == 200 for r in deleted), [r.text for r in deleted if r.status_code != 200]
            await asyncio.to_thread(bench.recorded.wait_for, expected + BURST)
            batch.deletes = time.perf_counter() - start
    return batch


def _audit_rows(store: Store) -> int:
    return int(str(store.read("SELECT count(*) FROM audit")[0][0]))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=150, help="interleaved request cycles each way")
    parser.add_argument("--batches", type=int, default=2, help=f"bursts of {BURST} creates each way")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        parts = make_parts(Path(work))
        manager = parts.manager(limits=Limits(max_vms=10_000, max_vms_per_user=10_000))
        settings = load_settings(state_dir=Path(work) / "state")
        service = ControllerService(Controller(settings, parts.store, parts.network, manager),  # type: ignore[arg-type]
                                    api_key="bench-operator", tokens=ViewerTokens(b"k" * 32))
        service.quotas.set(TENANT, Quota(max_vms=10_000, max_mem_mib=1 << 30, logins_per_hour=100))
        _, key = service.keys.create("bench", Role.TENANT, TENANT)
        commits = Commits()
        service.audit._write = commits.wrap(service.audit._write)  # type: ignore[method-assign,assignment]
        app = build_app(service)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off",
                                               log_level="warning", access_log=False,
                                               # a burst's early answers idle their connections for seconds
                                               # before the deletes reuse them: not closed meanwhile
                                               timeout_keep_alive=120))
        loop = asyncio.new_event_loop()
        serving = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
        serving.start()
        deadline = time.monotonic() + 10
        while not server.started:  # uvicorn has no event to wait on
            if time.monotonic() > deadline or not serving.is_alive():
                raise RuntimeError(f"uvicorn did not start serving on 127.0.0.1:{port} within 10 s")
            time.sleep(0.01)
        # The trail's writer, as service.start() runs it: without it each entry would be a commit of its own.
        writer: Future[None] = asyncio.run_coroutine_threadsafe(service.audit.run(), loop)
        bench = Bench(service, app.state, parts.store, f"http://127.0.0.1:{port}", key)
        try:
            cycles: dict[bool, list[Cycle]] = {True: [], False: []}
            with httpx.Client(base_url=bench.url, headers=bench.headers, trust_env=False) as client:
                for real in (True, False):  # warm both paths (imports, first key use's last-used write)
                    _cycle(bench, client, real)
                for run in range(args.runs):
                    for real in ((True, False) if run % 2 == 0 else (False, True)):
                        cycles[real].append(_cycle(bench, client, real))
            batches: dict[bool, list[Batch]] = {True: [], False: []}
            for n in range(args.batches):
                for real in ((True, False) if n % 2 == 0 else (False, True)):
                    batches[real].append(asyncio.run(_burst(bench, real, commits)))
        finally:
            writer.cancel()
            server.should_exit = True
            serving.join(timeout=10)
            stop_all(parts)
    _report(args.runs, cycles, batches)


def _report(runs: int, cycles: dict[bool, list[Cycle]], batches: dict[bool, list[Batch]]) -> None:
    real, stub = cycles[True], cycles[False]
    print(f"per request, {runs} interleaved runs each way, fake VMM (ms: median, p95; added = median of paired "
          "differences):")
    print(f"  {'request':<28}{'real':>8} {'p95':>8}{'stubbed':>9} {'p95':>8}{'added':>9}{'ratio':>8}")
    rows: list[tuple[str, Callable[[Cycle], float]]] = [
        ("POST /v1/vms?wait=true", lambda c: c.post), ("GET /v1/vms/{id}", lambda c: c.get),
        ("DELETE /v1/vms/{id}", lambda c: c.delete)]
    for name, of in rows:
        print(_row(name, [of(c) for c in real], [of(c) for c in stub]))
    added_per_request = _paired([c.total for c in real], [c.total for c in stub]) / 3
    ratio = statistics.median(c.total for c in real) / statistics.median(c.total for c in stub)
    print(f"  {'the three, per request':<28}{'':>36}{added_per_request:9.2f}{ratio:7.2f}x")
    print("  from the request until its audit entry is committed (after the answer, off the client's path):")
    print(_row("  POST ... committed", [c.post_committed for c in real], [c.post_committed for c in stub]))
    print(_row("  DELETE ... committed", [c.delete_committed for c in real], [c.delete_committed for c in stub]))

    print(f"\n{BURST} concurrent POST /v1/vms?wait=true, {len(batches[True])} bursts each way (the fastest of each; "
          "another process's load only adds time):")
    trail, noop = min(batches[True], key=lambda b: b.wall), min(batches[False], key=lambda b: b.wall)
    for name, batch in (("audit trail", trail), ("no-op trail", noop)):
        rate = batch.entries / batch.wall if batch.wall else 0.0
        capacity = (f" ({batch.write_s * 1000:.1f} ms inside them, waits for the store's write lock included: "
                    f"{batch.entries / batch.write_s:,.0f}/s)" if batch.write_s else "")
        print(f"  {name:<12} answers {batch.answers:5.2f} s, all committed {batch.wall:5.2f} s, CPU {batch.cpu:5.2f} s "
              f"(then the {BURST} DELETEs {batch.deletes:5.2f} s)")
        print(f"  {'':<12} {batch.entries} entries, {rate:.0f}/s over the burst (as fast as the creates came), "
              f"in {batch.commits} commits{capacity}")
    batch_ratio, cpu_ratio = trail.wall / noop.wall, trail.cpu / noop.cpu
    pairs = [r.wall / s.wall for r, s in zip(batches[True], batches[False], strict=True)]
    print(f"  trail / no-op: wall {batch_ratio:.2f}x (each round's pair: {', '.join(f'{p:.2f}x' for p in pairs)}), "
          f"CPU {cpu_ratio:.2f}x")

    print("\ntargets:")
    print(f"  added per request (auth + audit + quota)  {added_per_request:7.2f} ms   <= {TARGET_ADDED_MS:g} ms    "
          f"{'PASS' if added_per_request <= TARGET_ADDED_MS else 'MISS'}")
    print(f"  {BURST} creates, trail vs no-op (wall)        {batch_ratio:7.2f}x     <= {TARGET_BATCH_RATIO:.2f}x  "
          f"{'PASS' if batch_ratio <= TARGET_BATCH_RATIO else 'MISS'}")
    print(f"  entries written of {BURST}                   {trail.entries:7d}       = {BURST}       "
          f"{'PASS' if trail.entries == BURST else 'MISS'}")


def _row(name: str, real: list[float], stub: list[float]) -> str:
    added = _paired(real, stub)
    ratio = statistics.median(real) / statistics.median(stub)
    return (f"  {name:<28}{statistics.median(real) * 1000:8.2f} {_p95(real):8.2f}"
            f"{statistics.median(stub) * 1000:9.2f} {_p95(stub):8.2f}{added:9.2f}{ratio:7.2f}x")


def _paired(real: list[float], stub: list[float]) -> float:
    return statistics.median(r - s for r, s in zip(real, stub, strict=True)) * 1000


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000


if __name__ == "__main__":
    main()
