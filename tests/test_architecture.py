"""The package's shape stays as docs/architecture.md describes it.

The layer contracts themselves are checked by import-linter in ``make lint``; here: no module takes part in an import
cycle (within a layer too, which layer contracts do not see), and no module grows past the size a reader can hold.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

PACKAGE = Path(__file__).resolve().parents[1] / "fabric_ckpt"
MAX_MODULE_LINES = 600
# Imports inside functions are for optional dependencies (numpy, zstandard, safetensors, ...), imported only when a
# user's data needs them; never to dodge an import cycle, which the layers rule out.
MAX_LOCAL_IMPORTS = 10


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm over the package's own imports)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = [0]

    def visit(module: str) -> None:
        index[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_itself_through_others():
    graph = grimp.build_graph("fabric_ckpt", include_external_packages=False)
    # A package's __init__ importing its own submodules is how packages re-export; not a cycle of design.
    for package in [m for m in graph.modules if graph.find_children(m)]:
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_no_module_is_longer_than_a_reader_can_hold():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES} == {}


def test_imports_inside_functions_are_only_for_optional_dependencies():
    local = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom):
                        local.append(f"{path.relative_to(PACKAGE)}:{sub.lineno} {sub.module}")
                    elif isinstance(sub, ast.Import):
                        local.append(f"{path.relative_to(PACKAGE)}:{sub.lineno} {sub.names[0].name}")
    assert not [entry for entry in local if " fabric_ckpt" in entry], local
    assert len(local) <= MAX_LOCAL_IMPORTS, local
