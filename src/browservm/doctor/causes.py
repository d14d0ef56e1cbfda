"""Cause codes: stable identifiers for what the doctor found wrong, each with the fix to apply.

Programs and tests match on these codes, never on the wording of a summary. A code names
the thing that is wrong (`bridge.down`), not the hop where it showed; the hop travels
beside it in the report. New codes may be added; an existing code never changes meaning.
"""

from __future__ import annotations

FIXES: dict[str, str] = {
    # the host network (doctor's host.* pieces)
    "netns.missing": "run `browservm host up` with the same --netns (it creates the namespace and what is in it)",
    "state.missing": "this state directory has never been set up: run `browservm host up` (or `browservm serve`)",
    "bridge.missing": "run `browservm host up`: it creates the bridge and its gateway address",
    "bridge.not_bridge": "another program made a non-bridge link with the bridge's name: remove it or "
                         "configure another --bridge, then run `browservm host up`",
    "bridge.down": "bring the bridge up: `browservm host up` (or `ip link set BRIDGE up`)",
    "bridge.no_address": "put the gateway address back on the bridge: `browservm host up`",
    "bridge.address_elsewhere": "another link carries an address in the VM subnet: remove it, or configure "
                                "another --subnet",
    "bridge.changed": "a property `host up` set on the bridge was changed afterwards: the evidence names it with "
                      "the value browservm set, the value found and the command that puts it back",
    "netns.changed": "a property `host up` set in the namespace was changed afterwards: the evidence names it and "
                     "the command that puts it back",
    "routing_rule.changed": "the routing rules are not in the order `host up` put them: the evidence names the "
                            "rule and the commands that put it back",
    "forwarding.off": "turn forwarding back on: `browservm host up` (VMs cannot reach the uplink without it)",
    "nft.table_missing": "someone deleted browservm's nftables tables (a firewall reload?): `browservm host up` "
                         "puts them back; `serve` restores them by itself",
    "nft.table_changed": "browservm's nftables tables are not as `host up` wrote them: run `browservm host up`",
    "routing_rule.missing": "run `browservm host up` to put back the policy-routing rule",
    "firewall.foreign_drop": "a firewall rule outside browservm's tables drops the VMs' traffic: remove it or "
                             "add an exception for the VM bridge and subnet",
    "firewall.foreign_policy": "a base chain outside browservm's tables drops by policy: VM traffic it sees "
                               "needs an accept rule there",
    "uplink.missing": "the configured --uplink does not exist: configure the interface that leads out",
    "uplink.down": "bring the uplink up, or configure another --uplink",
    "host.check_failed": "see `browservm host status`; `browservm host up` repairs what browservm made",
    "probe.error": "the doctor could not look at this piece (see the evidence); run it as root",
    # what future VMs would boot with (host.vmm, host.kernel, host.image)
    "vmm.missing": "install the VMM: `apt-get install qemu-system-x86` for QEMU, or put firecracker on PATH",
    "vmm.unusable": "Firecracker needs a usable /dev/kvm: use --vmm qemu (or auto) on this host",
    "kernel.missing": "point --kernel at an existing ELF vmlinux, or leave it unset to use browservm's own",
    "kernel.unreadable": "the file is not a kernel image browservm can read: check `browservm kernel inspect PATH`",
    "kernel.unfit": "this kernel cannot boot as a microVM guest: `browservm kernel build` makes one that can",
    "kernel.no_ip_pnp": "use a kernel with CONFIG_IP_PNP (`browservm kernel build`) or let the image's "
                        "configurator run (an image built by `browservm image build`, without browservm.net=off)",
    "image.missing": "point --rootfs at an existing image, or leave it unset to use browservm's own",
    "image.unreadable": "the image is not an ext4 file system debugfs can read: rebuild it with "
                        "`browservm image build`",
    "guest.no_configurator": "the image has no browservm-net: use an image built by `browservm image build`",
    "guest.no_network_config": "nothing in the guest would apply ip=: use a kernel with CONFIG_IP_PNP "
                               "(`browservm kernel build`) or an image built by `browservm image build`",
    # one VM
    "vm.released": "the VM failed and its resources were released: create it again with --keep-failed to "
                   "diagnose it live; the recorded failure and console are the evidence",
    "vm.not_started": "the VM has no VMM yet: wait for its create to get past vmm.spawn",
    "vmm.dead": "the VM's VMM process is gone: its vmm.log and console tail say why; `browservm vm rm` and "
                "create it again",
    "vmm.config_unreadable": "the doctor cannot read the VMM's configuration (see the evidence)",
    "tap.mismatch": "the VMM uses another TAP than the record says (the incident's iface_id bug): destroy and "
                    "recreate the VM; report a bug if it happens again",
    "mac.mismatch": "the VMM gives the guest another MAC than the record says, so ARP replies come from a MAC "
                    "the host does not expect: destroy and recreate the VM",
    "ip.mismatch": "the guest's ip= is not the address the record (and the lease) holds: destroy and recreate "
                   "the VM",
    "tap.missing": "the VM's TAP is gone and its VMM is cut off: `browservm vm rm` and create the VM again",
    "tap.detached": "re-attach the TAP to its bridge (`browservm vm rm` and create again, or "
                    "`ip link set TAP master BRIDGE` and `bridge link set dev TAP isolated on`)",
    "tap.wrong_bridge": "the TAP is a port of another bridge than the VM's: recreate the VM",
    "tap.down": "bring the TAP up: `ip link set TAP up` in the VM namespace",
    "tap.not_isolated": "the TAP is not an isolated bridge port, so VMs can reach each other: "
                        "`bridge link set dev TAP isolated on`, or recreate the VM",
    "tap.changed": "a property `vm create` set on the VM's TAP was changed afterwards: the evidence names it with "
                   "the value browservm set, the value found and the command that puts it back (or `browservm vm "
                   "rm` and create the VM again)",
    "tap.not_ours": "the TAP's alias names another VM or controller: recreate the VM",
    "address.conflict": "another VM record holds this VM's address or MAC: destroy one of them",
    "neighbour.conflict": "the host's neighbour table maps the VM's address to another MAC: another machine on "
                          "the bridge claims it; find the port it comes from (`bridge fdb`)",
    "console.missing": "the VM's console log is missing or empty: the VMM never started the guest (see vmm.log)",
    "guest.network_pending": "the guest has not configured its network yet: it may still be booting; run the "
                             "doctor again in a minute",
    "guest.configurator_failed": "the image's network configurator ran and failed: its console line says why",
    "guest.configurator_disabled": "the configurator was disabled (browservm.net=off) and the kernel did not "
                                   "apply ip=: remove browservm.net=off or use a kernel with CONFIG_IP_PNP",
    "arp.no_reply": "the guest does not answer ARP: its eth0 is down or has another address; the console shows "
                    "what configured it",
    "arp.wrong_mac": "another machine answers ARP for the VM's address: find it (`bridge fdb`) and remove it",
    "desktop.not_ready": "the guest's desktop did not report its listener (Xvnc or x11vnc, or websockify) up: "
                         "the console's browservm-ready lines say which part is missing",
    "desktop.part_failed": "a part of the guest's desktop failed or exited: the console's browservm-ready line "
                           "names it; recreate the VM",
    "desktop.port_closed": "nothing listens on the desktop's port in the guest (the VNC server on :5901, or "
                           "websockify on :6080, is not running): recreate the VM; "
                           "the console shows whether the desktop supervisor reported it exiting",
    "tcp.timeout": "connections to the desktop's port are silently dropped: look for a firewall in the guest or on "
                   "the host",
    "tcp.unreachable": "the host has no route to the VM's address: the bridge lacks its address or a routing "
                       "rule refuses it; run `browservm host up`",
    "ws.refused": "something answers on :6080 but it is not websockify: recreate the VM",
    "ws.timeout": "websockify accepted the connection but did not answer the upgrade: the guest may be "
                  "overloaded; recreate the VM",
    "vnc.unreachable": "the connection closed before any RFB byte (websockify could not reach the VNC server, or it "
                       "refused the controller): the VNC server stopped in the guest; recreate the VM",
    "rfb.timeout": "the connection is up but the VNC server never spoke: it hangs; recreate the VM",
    "rfb.bad_banner": "what answers is not the VNC server browservm expects: recreate the VM",
    "desktop.incomplete": "the desktop's last part (the browser) has not reported ready: the console's "
                          "browservm-ready lines say which part is missing",
}


def fix(code: str) -> str:
    return FIXES.get(code, "")
