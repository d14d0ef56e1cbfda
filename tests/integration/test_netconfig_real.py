"""The guest configurator against real links, inside a namespace standing in for a guest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from browservm.guest.markers import parse_marker

from .conftest import Namespaces, run

pytestmark = pytest.mark.host

STATIC = "ip=192.168.100.3::192.168.100.1:255.255.255.0:vm-real:eth0:off:192.168.100.1"
PROGRAM = ("import socket, sys\nfrom browservm.guest.netconfig import main\n"
           "rc = main(sys.argv[1:])\nprint('hostname', socket.gethostname())\nsys.exit(rc)\n")


def configurator(netns: str, cmdline: Path, *extra: str) -> subprocess.Popen[str]:
    # A UTS namespace of its own, so setting the guest's hostname cannot touch this machine's.
    argv = ["unshare", "--uts", "--", "ip", "netns", "exec", netns, sys.executable, "-c", PROGRAM,
            "--cmdline-file", str(cmdline), "--resolv-conf", str(cmdline.with_name("resolv.conf")), *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outcome(proc: subprocess.Popen[str]) -> tuple[int, dict[str, str], str]:
    out, err = proc.communicate(timeout=60)
    marker = next(m for m in map(parse_marker, out.splitlines()) if m is not None)
    hostname = next(line.split()[1] for line in out.splitlines() if line.startswith("hostname "))
    assert marker[0] == "net", err
    return proc.returncode, marker[1], hostname


def test_the_configurator_sets_up_a_real_link_and_is_a_no_op_the_second_time(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create("guest")
    run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"console=ttyS0 {STATIC}\n")

    code, fields, hostname = outcome(configurator(ns, cmdline))
    assert code == 0 and fields["status"] == "ok" and fields["by"] == "configurator"
    assert hostname == "vm-real"
    link = json.loads(run("ip", "-j", "-4", "addr", "show", "dev", "eth0", netns=ns).stdout)[0]
    assert "UP" in link["flags"]
    assert [(a["local"], a["prefixlen"]) for a in link["addr_info"]] == [("192.168.100.3", 24)]
    routes = json.loads(run("ip", "-j", "route", "show", "default", netns=ns).stdout)
    assert [(r["gateway"], r["dev"]) for r in routes] == [("192.168.100.1", "eth0")]
    assert (tmp_path / "resolv.conf").read_text() == "nameserver 192.168.100.1\n"

    code, fields, _ = outcome(configurator(ns, cmdline))
    assert code == 0 and fields["by"] == "kernel"  # already configured: nothing done


def test_the_configurator_waits_for_a_late_device_and_gives_up_at_its_deadline(
        namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.create("guest")
    cmdline = tmp_path / "cmdline"
    cmdline.write_text(f"{STATIC}\n")
    waiting = configurator(ns, cmdline, "--timeout", "30")
    run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    code, fields, _ = outcome(waiting)
    assert code == 0 and fields["status"] == "ok"

    cmdline.write_text(STATIC.replace("eth0", "eth9") + "\n")
    code, fields, _ = outcome(configurator(ns, cmdline, "--timeout", "0.5"))
    assert code == 1 and fields["reason"] == "device eth9 did not appear within 0.5 s"
