"""The `browservm vm` commands' refusals: clear, naming the field, and before anything is created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from browservm.hostnet.netns import NetworkNamespace

from .conftest import Namespaces

pytestmark = pytest.mark.host


def browservm(*args: str, state: Path, netns: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "browservm", *args, "--netns", netns, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize(("args", "field"), [
    (["--vcpus", "0"], "vcpus"), (["--mem", "8"], "mem_mib"), (["--boot-arg", "quiet"], "extra"),
    (["--user", ""], "user"),
])
def test_vm_create_refuses_bad_input_before_creating_anything(
        namespaces: Namespaces, tmp_path: Path, args: list[str], field: str) -> None:
    ns = namespaces.name()
    result = browservm("vm", "create", "--json", *args, state=tmp_path, netns=ns)
    assert result.returncode == 2, result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["field"] == field
    assert not NetworkNamespace(ns).exists()
    assert not (tmp_path / "vms").exists()


def test_vm_show_and_rm_of_an_unknown_vm(namespaces: Namespaces, tmp_path: Path) -> None:
    ns = namespaces.name()
    shown = browservm("vm", "show", "vm-nothere", state=tmp_path, netns=ns)
    assert shown.returncode == 1 and "no VM vm-nothere" in shown.stderr
    removed = browservm("vm", "rm", "vm-nothere", state=tmp_path, netns=ns)
    assert removed.returncode == 0 and "nothing to do" in removed.stdout
    bad = browservm("vm", "rm", "../etc", state=tmp_path, netns=ns)
    assert bad.returncode == 2 and "vm_id" in bad.stderr
