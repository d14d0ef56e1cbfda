"""No module of browservm imports, directly or through others, a module that imports it back.

Python tolerates a cycle when one of its imports sits inside a function, which is how one hid in
the CLI (vm.py and remote.py); the modules then cannot be read, tested or moved one at a time.
Imports are read with `ast`, nested ones included, so a hidden cycle counts as any other.
"""

from __future__ import annotations

import ast
from importlib import resources
from pathlib import Path

PACKAGE = Path(str(resources.files("browservm")))


def _modules(root: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the modules of the package it imports (a package's own __init__ only when named itself)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_bytes())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.rsplit(".", node.level - 1)[0]
                    base = f"{parent}.{base}" if base else parent
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:  # `from browservm.cli import remote`: the module
                        imported.add(f"{base}.{alias.name}")
                    elif base in modules:
                        imported.add(base)
        graph[name] = imported - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = [stack.pop()]
            while group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def test_no_module_of_browservm_is_part_of_an_import_cycle() -> None:
    modules = _modules(PACKAGE)
    assert "browservm.cli.vm" in modules and "browservm.guest.bootargs" in modules  # the walk finds them
    assert _cycles(_graph(modules)) == []


def test_a_cycle_hidden_in_a_function_is_found(tmp_path: Path) -> None:
    package = tmp_path / "browservm"
    (package / "cli").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "cli" / "__init__.py").write_text("")
    (package / "cli" / "vm.py").write_text("def run() -> None:\n    from browservm.cli import remote\n")
    (package / "cli" / "remote.py").write_text("from browservm.cli import vm as output\n")
    (package / "cli" / "login.py").write_text("from .remote import output\n")
    assert _cycles(_graph(_modules(package))) == [["browservm.cli.remote", "browservm.cli.vm"]]
