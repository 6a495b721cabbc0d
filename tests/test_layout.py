"""The code's shape (STYLE.md §1, §11; ARCHITECTURE.md "Interfaces"): small modules, the runtime never
importing the export stage or the benchmarks, and no import cycles.

Imports are read with ``ast`` from the source, function-level (lazy) imports included: a cycle
closed inside a function is still a cycle, it only fails later. An import names the most specific
module it reaches (``from .x import y`` is an edge to ``x.y`` where that is a module, else to ``x``);
the parent packages an import runs implicitly are not edges.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"prism_rt": ROOT / "prism_rt", "prism_export": ROOT / "export" / "prism_export"}
MAX_LINES = 450
FOREIGN_TO_RUNTIME = ("prism_export", "prism_bench")


def _modules() -> dict[str, Path]:
    """Dotted module name → file, for every module of the packages (sub-packages included)."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str) -> list[tuple[str, int]]:
    """Every module name ``module`` imports (absolute, resolved), with its line, at any depth."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if _is_package(module) else module.rpartition(".")[0]
    # imports under ``if TYPE_CHECKING:`` never run: annotations only, not edges
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}
    names = []
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            for alias in node.names:
                full = f"{stem}.{alias.name}"
                names.append((full if full in MODULES else stem, node.lineno))
    return names


def _graph() -> dict[str, set[str]]:
    """Module → the modules of the packages it imports."""
    graph = {}
    for module in MODULES:
        edges = set()
        for name, _ in _imports(module):
            while name and name not in MODULES:  # ``import prism_rt.x.y`` where y is a name: its module
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add(name)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        start = min(component)
        # breadth-first from start back to start inside the component: the shortest cycle through it
        paths, seen = [[start]], {start}
        while paths:
            path = paths.pop(0)
            nxt = sorted(w for w in graph[path[-1]] if w in component)
            if start in nxt:
                cycles.append(path + [start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append(path + [w])
    return cycles


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_module_is_over_the_line_limit(package):
    long = {m: n for m, path in MODULES.items() if m.split(".")[0] == package
            and (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along their seams): {long}"


def test_the_runtime_never_imports_the_export_stage_or_the_benchmarks():
    found = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {name}"
             for m in MODULES if m.split(".")[0] == "prism_rt"
             for name, line in _imports(m) if name.split(".")[0] in FOREIGN_TO_RUNTIME]
    assert not found, "the runtime must not import prism_export / prism_bench:\n" + "\n".join(found)


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    cycles = [c for c in _cycles(_graph()) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" → ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_lazy_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_imports_resolve_to_modules():
    edges = _graph()
    assert "prism_rt.errors" in edges["prism_rt.precision"]  # ``from .errors import SettingsError``
    assert all(e in MODULES for targets in edges.values() for e in targets)
