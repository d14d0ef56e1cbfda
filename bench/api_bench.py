"""What the controller service adds to a create: POST /v1/vms?wait=true against VMManager.create alone.

Run: .venv/bin/python bench/api_bench.py [--runs 200]

Both sides run the same manager with the unit tests' fakes (tests/unit/fakes.py: TAPs as a set,
every hop passing at once, a real `sleep` process as the VMM), in the same run, so what is left
between them is the service's own cost: HTTP over loopback through uvicorn, routing, pydantic,
JSON, the record's description. Target: <= 10 ms added per create. A real guest's create-to-ready
(seconds under emulation) is in bench/vm_bench.py; this isolates the part the controller adds.
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
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the fakes live with the unit tests

from browservm.api.app import build_app
from browservm.api.service import ControllerService
from browservm.api.tokens import ViewerTokens
from browservm.config import load_settings
from browservm.controller import Controller
from browservm.vm.parts import Limits
from tests.unit.fakes import make_parts, stop_all

TARGET_MS = 10.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        parts = make_parts(Path(work))
        limits = Limits(max_vms=10_000, max_vms_per_user=10_000)
        manager = parts.manager(limits=limits)
        settings = load_settings(state_dir=Path(work) / "state")
        service = ControllerService(Controller(settings, parts.store, parts.network, manager),  # type: ignore[arg-type]
                                    api_key="bench", tokens=ViewerTokens(b"k" * 32))
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(build_app(service), host="127.0.0.1", port=port, lifespan="off",
                                               log_level="warning", access_log=False))
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True).start()
        while not server.started:
            time.sleep(0.01)
        try:
            direct, through = [], []
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer bench"},
                                  trust_env=False)
            for _ in range(args.runs):
                # The manager alone, on the server's own loop (as the route runs it).
                start = time.perf_counter()
                record = asyncio.run_coroutine_threadsafe(manager.create(user="bench"), loop).result()
                direct.append(time.perf_counter() - start)
                asyncio.run_coroutine_threadsafe(manager.destroy(record.vm_id), loop).result()
                start = time.perf_counter()
                response = client.post("/v1/vms", params={"wait": "true"}, json={"user": "bench"})
                through.append(time.perf_counter() - start)
                assert response.status_code == 200 and response.json()["state"] == "ready", response.text
                asyncio.run_coroutine_threadsafe(manager.destroy(response.json()["vm_id"]), loop).result()
            client.close()
        finally:
            server.should_exit = True
            time.sleep(0.3)
            stop_all(parts)
    median_direct, median_through = statistics.median(direct) * 1000, statistics.median(through) * 1000
    print(f"create to ready, {args.runs} runs each, fakes for the guest (median, p90):")
    print(f"  VMManager.create alone      {median_direct:7.2f} ms   p90 {_p90(direct):7.2f} ms")
    print(f"  POST /v1/vms?wait=true      {median_through:7.2f} ms   p90 {_p90(through):7.2f} ms")
    print(f"  added by the service        {median_through - median_direct:7.2f} ms   (target <= {TARGET_MS:g} ms; "
          f"ratio {median_through / median_direct:.2f}x)")


def _p90(values: list[float]) -> float:
    return sorted(values)[int(len(values) * 0.9)] * 1000


if __name__ == "__main__":
    main()
