"""One TAP per VM: made, attached to its bridge as a checked port, and removed. On every VM's start-up
path: `add_tap` runs in the calling thread, without pyroute2 or an nft process.

A VM's TAP is labelled with this controller's tag and the VM's id (links.py), so a controller never
takes another's TAPs for its own; a TAP half made by an interrupted `add_tap` carries no label, but
its name is derived from a VM id in our own lease table, which makes it ours.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from ipaddress import IPv4Address

from browservm.errors import HostNetworkError
from browservm.faults import crash_point
from browservm.hostnet.expected import vm_port
from browservm.hostnet.firewall import Nftables, VmPort, VmPorts, listed_egress, listed_ports
from browservm.hostnet.links import LinkInfo, Links, attach_port, create_tap
from browservm.hostnet.netns import NetworkNamespace
from browservm.hostnet.portlock import PortLock
from browservm.hostnet.rtnl import RtnlSocket
from browservm.hostnet.worker import NetlinkThread
from browservm.ids import names_for
from browservm.ipam import Ipam, Lease
from browservm.netplan import NetworkPlan


class VmTaps:
    def __init__(self, plan: NetworkPlan, ipam: Ipam, netns: NetworkNamespace, thread: NetlinkThread, *,
                 owner: str, tap_owner: tuple[int, int], nft: Nftables, port_lock: PortLock) -> None:
        self._plan = plan
        self._ipam = ipam
        self._netns = netns
        self._thread = thread
        self._owner = owner
        self._tap_owner = tap_owner
        self._nft = nft
        self._ports = VmPorts(netns.name)
        self._port_lock = port_lock

    def add(self, lease: Lease) -> None:
        """Create the VM's TAP, owned by the VMM user, as an up, isolated and checked port of its bridge.

        In the calling thread, without pyroute2 or an nft process: this is on every VM's start-up path.
        """
        with self._netns.entered():
            index = create_tap(lease.tap, *self._tap_owner, netns=self._netns.name)
            # A crash here leaves a TAP without its alias; `remove` and `owned` know it by its name.
            crash_point("net.tap.created")
            self._attach(lease, index)

    def set_up(self, tap: str, up: bool) -> None:
        """Bring the VM's TAP up or down (a restored Firecracker VM's link is held down this way until it
        has taken its own identity: Firecracker has no link control of its own)."""
        with self._netns.entered():
            rtnl = RtnlSocket()
            try:
                rtnl.set_up(socket.if_nametoindex(tap), up)
            except OSError as exc:
                raise HostNetworkError("set TAP up" if up else "set TAP down", exc.strerror or str(exc), device=tap,
                                       netns=self._netns.name) from exc
            finally:
                rtnl.close()

    def attach_link(self, lease: Lease) -> None:
        """Make the existing link named `lease.tap` the VM's port, as `add` does with the TAP it creates.

        For a device made by someone else for the VM (a stand-in guest's veth in
        the tests, a VMM that makes its own TAP). Removed by `remove`.
        """
        with self._netns.entered():
            try:
                index = socket.if_nametoindex(lease.tap)
            except OSError:
                raise HostNetworkError("attach link", "does not exist", device=lease.tap,
                                       netns=self._netns.name) from None
            self._attach(lease, index)

    def _attach(self, lease: Lease, index: int) -> None:
        """Attach the port, then allow its VM's addresses on it.

        The port joins the bridge in VM_PORT_GROUP in the same message, so from
        its first frame it is checked; until its elements are in, nothing matches
        and every frame is dropped. A failure leaves neither port nor elements.
        """
        port = VmPort(lease.tap, lease.mac, lease.address.ip, lease.egress)
        # The values `host status` and the doctor expect on this port: one description (expected.py).
        spec = vm_port(lease.vm_id, lease.tap, lease.bridge, lease.mac, lease.address.ip, controller=self._owner,
                       tap_owner=self._tap_owner)
        assert spec.alias is not None
        rtnl = RtnlSocket()
        try:
            with self._port_lock:
                attach_port(rtnl, index, spec.tap, spec.bridge, spec.alias, netns=self._netns.name, group=spec.group,
                            mac=spec.mac, address=spec.address)
                self._ports.add(port)
        except BaseException:
            with contextlib.suppress(HostNetworkError):  # the first error is the one to report
                self._forget_neighbour(rtnl, lease.bridge, lease.address.ip)
            rtnl.delete_link(index)
            raise
        finally:
            rtnl.close()

    def _forget_neighbour(self, rtnl: RtnlSocket, bridge: str, address: IPv4Address) -> None:
        try:
            rtnl.forget_neighbour(socket.if_nametoindex(bridge), address.packed)
        except OSError as exc:
            if exc.errno != errno.ENODEV:  # no bridge, no neighbour entry
                raise HostNetworkError("forget neighbour", exc.strerror or str(exc), device=bridge,
                                       netns=self._netns.name) from exc

    def remove(self, vm_id: str) -> bool:
        """Delete the VM's TAP, its set elements and its pinned neighbour entry; False if the TAP was gone.

        Never deletes a TAP another VM owns. A TAP with the VM's name and no
        alias at all is the VM's own, half made by an interrupted `add`: the
        caller names a VM of its own store, and only that VM's id derives this name.
        On the netlink thread.
        """
        names = names_for(vm_id)
        tap = names.tap
        with self._thread.inside() as links:
            link = links.get(tap)
            if link is not None and link.vm_of(self._owner) != vm_id and not link.half_made_tap:
                raise HostNetworkError("delete TAP", f"belongs to {link.alias or 'someone else'}, not VM {vm_id}",
                                       device=tap, netns=self._netns.name)
            with self._port_lock:
                if link is not None:
                    links.delete(link.index, link.name)  # the port first: it never carries unchecked frames
                listing = self._nft.list_table() if link is None else None
                lease = self._ipam.get(vm_id)
                address = lease.address.ip if lease is not None else None
                egress = lease.egress if lease is not None else None
                if address is None:
                    # The lease went first (an interrupted release): the sets still know the address and policy.
                    listing = listing if listing is not None else self._nft.list_table()
                    held = listed_ports(listing or []).get(tap, (None, None))[1]
                    address = IPv4Address(held) if held is not None else None
                    egress = listed_egress(listing or []).get(tap)
                if address is not None:
                    self._ports.remove(VmPort(tap, names.mac, address, egress))
                    rtnl = RtnlSocket()
                    try:
                        for segment in self._plan.segments:
                            if address in segment.network:
                                self._forget_neighbour(rtnl, segment.bridge, address)
                    finally:
                        rtnl.close()
            return link is not None

    def owned(self) -> dict[str, str]:
        """TAP name -> VM id, for every TAP that this controller made, half-made ones of leased VMs
        included. On the netlink thread."""
        with self._thread.inside() as links:
            return {link.name: vm_id for link, vm_id in self.ours(links, self._ipam.leases()).items()}

    def ours(self, links: Links, leases: list[Lease]) -> dict[LinkInfo, str]:
        """TAP -> VM id for the TAPs this controller made: labelled ones, and half-made ones of leased VMs."""
        every = links.all()
        ours = {link: vm_id for link in every if (vm_id := link.vm_of(self._owner)) is not None}
        by_name = {link.name: link for link in every}
        for lease in leases:
            link = by_name.get(lease.tap)
            if link is not None and link.half_made_tap:
                ours[link] = lease.vm_id
        return ours

    def attached(self, links: Links) -> list[VmPort]:
        """The VM ports that exist now (attached TAPs of ours with a lease), as the sets must hold them."""
        leases = {lease.vm_id: lease for lease in self._ipam.leases()}
        ports = []
        for link, vm_id in self.ours(links, list(leases.values())).items():
            lease = leases.get(vm_id)
            if lease is not None and link.name == lease.tap and link.master is not None:
                ports.append(VmPort(lease.tap, lease.mac, lease.address.ip, lease.egress))
        return ports
