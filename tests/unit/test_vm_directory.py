"""A VM's directory is named in one place (vmdir.py): no other module of browservm spells its files."""

from __future__ import annotations

import ast
from pathlib import Path

import browservm
from browservm import vmdir

NAMES = (vmdir.CONSOLE_LOG, vmdir.VMM_LOG, vmdir.OVERLAY, vmdir.CONFIG_DISK, vmdir.CONTROL_SOCKET, vmdir.VM_CONFIG)


def _spellings(source: Path) -> list[str]:
    """Every string constant in `source` that names a file of a VM's directory (alone or at a path's end)."""
    found = []
    for node in ast.walk(ast.parse(source.read_text(), str(source))):
        # A file name or a path, not prose that mentions one ("its vmm.log says why").
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and " " not in node.value
                and node.value.rsplit("/", 1)[-1] in NAMES):
            found.append(f"{source}:{node.lineno}: {node.value!r}")
    return found


def test_no_module_but_vmdir_spells_a_file_of_a_vms_directory() -> None:
    package = Path(browservm.__file__).parent
    spelled = [hit for source in sorted(package.rglob("*.py")) if source.name != "vmdir.py"
               for hit in _spellings(source)]
    assert spelled == []


def test_the_scan_finds_a_spelled_name(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text('x = directory / "console.log"\ny = "/vm-config.json"\nz = "its vmm.log says why"\n')
    assert len(_spellings(source)) == 2
