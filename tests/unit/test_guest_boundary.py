"""The guest's code is the package browservm.guest: the image carries it whole, and it needs nothing else.

The guest runs Debian's python3 with no site-packages (`python3 -IS`) and none of browservm's host
code, so a guest module that imports anything beyond the standard library and the guest package
fails only when the VM boots. These tests catch that on the host, without building an image.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from browservm.images.rootfs import GUEST_PROGRAMS, OAUTH_PROGRAMS, PROFILES, guest_files, guest_modules

GUEST = Path(str(resources.files("browservm.guest")))
SHIPPED = "usr/lib/browservm/browservm/"


def _imports(source: bytes, package: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a module of `package`, nested ones too; relative imports resolved."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            # `from browservm.guest import configdisk` imports the module browservm.guest.configdisk
            found += [(node.lineno, f"{base}.{alias.name}" if base in ("browservm", "browservm.guest") else base)
                      for alias in node.names]
    return found


# A Debian package a guest module may import, and the images that ship the module carry that package
# (the module puts Debian's dist-packages on the path itself: the programs start without site).
DEBIAN_IMPORTS = {"guest/profile_keeper.py": ("cryptography", "python3-cryptography")}


def _outside(path: Path) -> list[str]:
    """What a module of the guest package imports that the guest does not carry."""
    relative = str(path.relative_to(GUEST.parent))
    package = ".".join(("browservm", *path.relative_to(GUEST.parent).parent.parts))
    debian = DEBIAN_IMPORTS.get(relative, ("", ""))[0]
    return [f"{relative}:{line} imports {module}" for line, module in _imports(path.read_bytes(), package)
            if not _allowed(module) and (not debian or module.partition(".")[0] != debian)]


def test_a_debian_package_imported_in_the_guest_is_in_every_image_that_runs_the_module() -> None:
    for module, (_, package) in DEBIAN_IMPORTS.items():
        program = module.removesuffix(".py").replace("/", ".")
        images = [profile for profile in PROFILES
                  if any(f"from browservm.{program} import" in content.decode(errors="replace")
                         for path, content in guest_files(profile).items()
                         if path.startswith("usr/lib/browservm/bin/"))]
        assert images, f"no image runs {module}"
        assert all(package in PROFILES[profile] for profile in images), (module, images)


def _allowed(module: str) -> bool:
    return (module.partition(".")[0] in sys.stdlib_module_names
            or module == "browservm.guest" or module.startswith("browservm.guest."))


def test_every_guest_module_imports_only_the_standard_library_and_guest_modules() -> None:
    modules = sorted(GUEST.rglob("*.py"))
    assert GUEST / "netconfig.py" in modules and GUEST / "bootargs.py" in modules  # the walk finds them
    assert [problem for path in modules for problem in _outside(path)] == []


def test_the_check_catches_host_code_and_third_party_packages_however_imported() -> None:
    source = b"""import json
from . import configdisk
from .markers import format_marker
from browservm.guest import errors


def late() -> None:
    import httpx
    from browservm import ids
    from ..vm.console import terminal_safe
    from browservm.errors import InvalidInput
"""
    refused = [module for _, module in _imports(source, "browservm.guest") if not _allowed(module)]
    assert refused == ["httpx", "browservm.ids", "browservm.vm.console", "browservm.errors"]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_the_image_carries_the_guest_package_whole_and_nothing_else_of_browservm(profile: str) -> None:
    shipped = {path.removeprefix(SHIPPED) for path in guest_files(profile) if path.startswith(SHIPPED)}
    in_folder = {str(path.relative_to(GUEST.parent)) for path in GUEST.rglob("*.py")}
    assert shipped == {"__init__.py", *in_folder} == set(guest_modules())


def test_every_guest_program_starts_from_the_shipped_modules_alone(tmp_path: Path) -> None:
    """Each program's module imports under `python3 -IS` from a directory holding only what the image
    carries: no site-packages, no host code."""
    for relative, content in guest_files("oauth").items():
        if relative.startswith(SHIPPED):
            target = tmp_path / relative.removeprefix(SHIPPED.removesuffix("browservm/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
    modules = sorted({*GUEST_PROGRAMS.values(), *OAUTH_PROGRAMS.values()})
    script = (f"import json, sys\nsys.path.insert(0, {str(tmp_path)!r})\n"
              f"for name in {modules!r}:\n    __import__(name)\n"
              "print(json.dumps(sorted(m for m in sys.modules if m.startswith('browservm'))))\n")
    done = subprocess.run([sys.executable, "-I", "-S", "-c", script], capture_output=True, text=True, timeout=60,
                          check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    loaded = [name for name in json.loads(done.stdout) if name != "browservm"]
    assert loaded and all(name.startswith("browservm.guest") for name in loaded)
