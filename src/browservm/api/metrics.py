"""Prometheus metrics of the controller, in a registry of its own.

    browservm_vms{state}                     VMs by state (read from the store at each scrape)
    browservm_stage_seconds{stage}           seconds from create to each hop passing
    browservm_failures_total{hop}            VMs failed, by the hop that failed
    browservm_viewers                        viewers connected now
    browservm_proxy_bytes_total{direction}   bytes relayed: to_vm, to_viewer
    browservm_proxy_closes_total{code}       viewer connections closed, by WebSocket close code
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from browservm.vm.state import VmState

_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600)


class _VmsByState(Collector):
    def __init__(self, states: Callable[[], list[VmState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("browservm_vms", "VMs by state", labels=["state"])
        states = self._states()
        for state in VmState:
            family.add_metric([state.value], sum(1 for s in states if s == state))
        yield family


class Metrics:
    def __init__(self, states: Callable[[], list[VmState]]) -> None:
        """`states` is called at each scrape, in the scraping thread (it may read the store)."""
        self.registry = CollectorRegistry()
        self.registry.register(_VmsByState(states))
        self.stage_seconds = Histogram("browservm_stage_seconds", "seconds from create to each hop passing",
                                       ["stage"], buckets=_STAGE_BUCKETS, registry=self.registry)
        self.ready_seconds = Histogram("browservm_ready_seconds", "seconds from create to ready, by how the VM "
                                       "started (cold: booted; restored: from a snapshot; pooled claims are "
                                       "browservm_pool_claim_seconds)", ["started_from"], buckets=_STAGE_BUCKETS,
                                       registry=self.registry)
        self.failures = Counter("browservm_failures", "VMs failed, by the hop that failed", ["hop"],
                                registry=self.registry)
        self.viewers = Gauge("browservm_viewers", "viewers connected now", registry=self.registry)
        self.proxy_bytes = Counter("browservm_proxy_bytes", "bytes relayed between viewers and VMs",
                                   ["direction"], registry=self.registry)
        self.proxy_closes = Counter("browservm_proxy_closes", "viewer connections closed, by close code",
                                    ["code"], registry=self.registry)
        self.pool_claims = Counter("browservm_pool_claims", "requests for a VM the warm pool could serve, by "
                                   "outcome (hit: a pooled VM; miss: restored or booted instead)", ["outcome"],
                                   registry=self.registry)
        self.claim_seconds = Histogram("browservm_pool_claim_seconds", "seconds to hand a pooled VM to a user",
                                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1), registry=self.registry)
        self.snapshot_age = Gauge("browservm_snapshot_age_seconds", "age of the newest snapshot VMs are restored from",
                                  registry=self.registry)

    def render(self) -> bytes:
        """The text exposition format. Blocking (reads the store): call it in a thread."""
        return generate_latest(self.registry)
