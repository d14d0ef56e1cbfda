"""The host side of the VM network, as one object: the façade that wires its pieces.

    lifecycle.py  `host up` and `host down`: what the plan needs, recorded before it is made (recorded.py)
    status.py     `host status`: every piece against what was set (expected.py, observed.py)
    drift.py      tables and routing rules someone else changed, put back; watch.py: the kernel's word of it
    installed.py  browservm's nftables tables as installed, recorded and checked
    taps.py       one TAP per VM: the hot path of every VM's start and end
    worker.py     the one thread pyroute2's work runs on; portlock.py: the lock of the VM ports' sets

The lifecycle, status and drift, and the removal and listing of TAPs, run on the netlink thread
(worker.py); `add_tap`, `set_tap_up` and `attach_link` run in the calling thread.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from browservm.errors import HostNetworkError
from browservm.hostnet.drift import Drift
from browservm.hostnet.expected import FIREWALL, Expectation
from browservm.hostnet.firewall import TABLES, Nftables
from browservm.hostnet.installed import InstalledFirewall
from browservm.hostnet.lifecycle import HostLifecycle
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.pieces import Change, Check
from browservm.hostnet.portlock import PortLock
from browservm.hostnet.recorded import HostRecords
from browservm.hostnet.status import HostStatus
from browservm.hostnet.sysctl import IP_FORWARD, Sysctl
from browservm.hostnet.taps import VmTaps
from browservm.hostnet.watch import RulesetWatch
from browservm.hostnet.worker import NetlinkThread
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan
from browservm.store import Store

__all__ = ["FIREWALL", "IP_FORWARD", "Change", "Check", "HostNetwork"]

P = ParamSpec("P")
R = TypeVar("R")


def _confined(method: Callable[Concatenate[HostNetwork, P], R]) -> Callable[Concatenate[HostNetwork, P], R]:
    """Run the method on the HostNetwork's netlink thread (worker.py)."""
    def confined(self: HostNetwork, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return self._thread.call(method, self, *args, **kwargs)
    functools.update_wrapper(confined, method)
    return confined


class HostNetwork:
    def __init__(self, plan: NetworkPlan, store: Store, netns: NetworkNamespace, *,
                 tap_owner: tuple[int, int] = (0, 0), nft: Nftables | None = None,
                 sysctl: Sysctl | None = None, adopt_bridge: bool = False) -> None:
        self.plan = plan
        self.netns = netns
        # Held while a VM port and its set elements change, and while the tables are replaced,
        # so a restore never drops the elements of a port being added.
        port_lock = PortLock(store.path.parent / "hostnet.lock")
        records = HostRecords(store)
        ipam = Ipam(store, plan)
        self._nft = nft or Nftables(netns=netns.name)
        self._thread = NetlinkThread(netns)
        self._closed = False
        store.claim("netns", netns.name or "")
        # Tags the TAPs this controller makes, so it never takes another controller's TAPs for its own.
        self.owner = hashlib.sha256(str(store.path.resolve()).encode()).hexdigest()[:8]
        self._taps = VmTaps(plan, ipam, netns, self._thread, owner=self.owner, tap_owner=tap_owner, nft=self._nft,
                            port_lock=port_lock)
        firewall = InstalledFirewall(plan, netns.name, records, self._nft, self._taps)
        self._lifecycle = HostLifecycle(plan, store, netns, self._thread, records=records, firewall=firewall,
                                        taps=self._taps, port_lock=port_lock,
                                        sysctl=sysctl or Sysctl(netns=netns.name), adopt_bridge=adopt_bridge)
        self._drift = Drift(plan, netns, self._thread, records=records, lifecycle=self._lifecycle, firewall=firewall,
                            port_lock=port_lock)
        self._status = HostStatus(plan, ipam, netns, self._thread, records=records, firewall=firewall,
                                  taps=self._taps, drift=self._drift, owner=self.owner, tap_owner=tap_owner)

    def close(self) -> None:
        if self._closed:
            return
        self._thread.shutdown()
        self._closed = True

    def __enter__(self) -> HostNetwork:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- host up / status / down, drift ------------------------------------------

    @_confined
    def up(self) -> list[Change]:
        return self._lifecycle.up()

    @_confined
    def down(self, force: bool = False) -> list[Change]:
        return self._lifecycle.down(force)

    @_confined
    def status(self) -> list[Check]:
        return self._status.status()

    @_confined
    def expected(self) -> Expectation:
        """What this state directory's `host up` and `add_tap` set, for `status` and the doctor to compare."""
        return self._status.expected()

    @_confined
    def check_and_restore(self) -> list[Change]:
        """Put back our tables and routing rules if anything removed or changed them; what it restored
        (drift.py)."""
        return self._drift.check_and_restore()

    @_confined
    def watch(self) -> RulesetWatch:
        """Notice when another program changes our tables or the namespace's routing rules (watch.py).
        HostNetworkError when the namespace does not exist."""
        with self.netns.entered():
            try:
                return RulesetWatch(TABLES)
            except OSError as exc:
                raise HostNetworkError("subscribe to nftables and routing-rule notifications",
                                       exc.strerror or str(exc), netns=self.netns.name) from exc

    def drift_events(self) -> list[tuple[float, str]]:
        """(time, what was restored) for the latest restorations, oldest first."""
        return self._drift.events()

    # --- one TAP per VM ------------------------------------------------------------

    def add_tap(self, lease: Lease) -> None:
        """Create the VM's TAP as an up, isolated and checked port of its bridge, in the calling thread."""
        self._taps.add(lease)

    def set_tap_up(self, tap: str, up: bool) -> None:
        self._taps.set_up(tap, up)

    def attach_link(self, lease: Lease) -> None:
        """Make the existing link named `lease.tap` the VM's port, as `add_tap` does with the TAP it creates."""
        self._taps.attach_link(lease)

    @_confined
    def remove_tap(self, vm_id: str) -> bool:
        """Delete the VM's TAP, its set elements and its pinned neighbour entry; False if the TAP was gone."""
        return self._taps.remove(vm_id)

    @_confined
    def owned_taps(self) -> dict[str, str]:
        """TAP name -> VM id, for every TAP that this controller made, half-made ones of leased VMs included."""
        return self._taps.owned()
