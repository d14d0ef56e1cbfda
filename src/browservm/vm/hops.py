"""The one vocabulary of hops: every name the manager records, the probes raise, the API returns
and the doctor prints comes from this list, in the order a VM passes them.

    net.lease  net.tap  disk.clone  vmm.spawn                                  resources
    guest.network  net.arp  desktop.ready  net.tcp  ws.upgrade  rfb.banner     readiness
    rfb.auth                                                                   a viewer's path only
    desktop.complete                                                           what a person sees

More names describe how a VM can fail outside that order: `images` (its kernel or golden image
could not be had), `vmm.exited` (its VMM process ended), `vmm.stopped` (the VMM lives but stopped
running its guest, e.g. a KVM internal error), `guest.stalled` (the guest's console went silent
before userspace while its VMM runs) and `controller` (the process creating it went away, or it
was cancelled).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Hop:
    name: str
    what: str  # what passing it means, for a person
    hint: str  # what to look at when it fails


NET_LEASE = "net.lease"
NET_TAP = "net.tap"
DISK_CLONE = "disk.clone"
VMM_SPAWN = "vmm.spawn"
GUEST_NETWORK = "guest.network"
NET_ARP = "net.arp"
DESKTOP_READY = "desktop.ready"
NET_TCP = "net.tcp"
WS_UPGRADE = "ws.upgrade"
RFB_BANNER = "rfb.banner"
RFB_AUTH = "rfb.auth"
DESKTOP_COMPLETE = "desktop.complete"
PROFILE_LOAD = "profile.load"
VMM_EXITED = "vmm.exited"
VMM_STOPPED = "vmm.stopped"
GUEST_STALLED = "guest.stalled"
IMAGES = "images"
CONTROLLER = "controller"

HOPS: tuple[Hop, ...] = (
    Hop(NET_LEASE, "an address is leased for the VM",
        "the subnet is full or the state database cannot be written; `browservm host status` shows the leases"),
    Hop(NET_TAP, "the VM's TAP exists, is up and is an isolated port of its bridge",
        "the bridge is missing (run `browservm host up`) or a link with the TAP's name exists"),
    Hop(DISK_CLONE, "the VM's own writable disk is in its directory",
        "the state directory's file system is full or not writable"),
    Hop(VMM_SPAWN, "the VMM process runs",
        "the VMM binary is missing or refused to start; its log (vmm.log in the VM's directory) says why"),
    Hop(GUEST_NETWORK, "the guest configured eth0 from ip= (kernel IP-Config or browservm-net)",
        "the guest never said it configured eth0; the reason says how far its console got (the image's "
        "browservm-net prints a browservm-net line, a kernel with CONFIG_IP_PNP an IP-Config line)"),
    Hop(NET_ARP, "the VM answers ARP for its address on its bridge, from its own MAC",
        "the guest does not answer ARP on its bridge: its interface is down, has another address, or its TAP "
        "is not the one the VMM uses (compare the TAP and MAC in `vm show` with the VMM's configuration)"),
    Hop(DESKTOP_READY, "the guest's desktop reported the listener of the VM's desktop path ready (the VNC "
                       "server, Xvnc or x11vnc, on :5901 on the rfb path, websockify on :6080 on the websockify path)",
        "the guest's desktop did not report its listener ready; the console shows which part failed"),
    Hop(NET_TCP, "the desktop path's port in the VM (:5901 rfb, :6080 websockify) accepts a TCP connection",
        "nothing accepts connections on that port in the guest; the desktop markers on the console show how "
        "far it got (on the rfb path, a VNC server without the VM's password listens on localhost only)"),
    Hop(WS_UPGRADE, "the WebSocket upgrade on :6080 is answered with 101 (websockify path only)",
        "something answers on :6080 but it is not websockify"),
    Hop(RFB_BANNER, "the VNC server's banner comes, RFB 3.8 or 3.7 (through the WebSocket on the websockify path)",
        "the port accepts but no VNC server speaks: on the websockify path, websockify cannot reach the VNC server on "
        "localhost:5901"),
    # Only the viewer's path passes it (the proxy authenticates for the viewer): readiness needs no password.
    Hop(RFB_AUTH, "the VNC server accepts the VM's own password, which only the controller knows",
        "the guest's VNC server did not take the password on the VM's config disk: the image's desktop is not "
        "browservm's, or the config disk was replaced; recreate the VM"),
    # RFB answers some 20 s (under emulation) before Chromium's window is there: until this hop a
    # viewer would show an empty grey screen.
    Hop(DESKTOP_COMPLETE, "every part of the desktop is up: the browser on screen (in the minimal profile, "
                          "which has no browser, its last part)",
        "the desktop's last part (usually Chromium) did not start; the console's browservm-ready lines say which"),
    # Only a VM with a persistent browser profile passes it (profiles/keeper.py), after the others.
    Hop(PROFILE_LOAD, "the user's browser profile is in the VM, and Chromium, started again with it, is on screen",
        "the guest's profile keeper (port 7002) did not take the profile; the reason is its answer, and the "
        "console's browservm-profile lines say more"),
)
RESOURCES = (NET_LEASE, NET_TAP, DISK_CLONE, VMM_SPAWN)
READINESS = (GUEST_NETWORK, NET_ARP, DESKTOP_READY, NET_TCP, WS_UPGRADE, RFB_BANNER, DESKTOP_COMPLETE)
NAMES = RESOURCES + READINESS  # what a create passes, in order

# Given by guest.network only when the console shows the kernel ignored ip=.
IP_PNP_HINT = ("the kernel lacks CONFIG_IP_PNP and the image's browservm-net did not configure eth0: use "
               "`browservm kernel build` or an image built by `browservm image build`")

_EXTRA_HINTS = {
    # The profile keeper's own hops (profiles/guest.py), each a step of profile.load.
    "profile.connect": "nothing answers on the guest's port 7002: its image has no profile keeper (the full and "
                       "oauth images have one), or the keeper failed; the console's browservm-profile lines say why",
    "profile.auth": "the guest's profile keeper refused the VM's key: the VM's config disk is not the one it booted "
                    "with; recreate the VM",
    "profile.protocol": "the guest's profile keeper answered something that is not its protocol, or too slowly",
    IMAGES: "the guest kernel or golden image could not be built or read; the build's log (named in the reason) "
            "says why",
    VMM_EXITED: "the VMM process exited; its own log and the console tail say why",
    VMM_STOPPED: "the VMM stopped running the guest; its own log (vmm_log) has its words. Under KVM: the host's "
                 "/dev/kvm cannot run this kernel (try --accel tcg); browservm chooses TCG for it from now on "
                 "when --accel is auto",
    GUEST_STALLED: "the guest kernel stopped printing before it started userspace while its VMM still runs: "
                   "under KVM, /dev/kvm cannot run this kernel (--accel tcg); under TCG, the host may be "
                   "overloaded (the reason says how busy the VMM was)",
    CONTROLLER: "the process creating the VM stopped before it was ready; create it again",
}
HINTS = {hop.name: hop.hint for hop in HOPS} | _EXTRA_HINTS


def hint(name: str) -> str:
    return HINTS.get(name, "")
