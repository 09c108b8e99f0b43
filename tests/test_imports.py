"""Every import inside the packages points down: no module imports one that imports it back, lazily or not.

The graph is read from the source (every `import` statement, also those inside functions), so a lazy import
that closes a circle is caught as surely as a top-level one, and so is one in an `if __name__ == "__main__":`
block (a command that must import what lies above its module gets a `__main__.py` of its own, which nothing
imports). Only imports under `if TYPE_CHECKING:` (never executed) are not edges.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cifar_train", "cifar_models")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _skipped_blocks(tree: ast.Module) -> list[ast.If]:
    def is_skipped(test: ast.expr) -> bool:
        text = ast.unparse(test)
        return "TYPE_CHECKING" in text

    return [node for node in ast.walk(tree) if isinstance(node, ast.If) and is_skipped(node.test)]


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in modules}
    if node.level:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join([*base, *([node.module] if node.module else [])])
    else:
        prefix = node.module or ""
    submodules = {f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in modules}
    names_only = len(submodules) < len(node.names)  # `from pkg import name` reaches pkg itself
    return submodules | ({prefix} if names_only and prefix in modules else set())


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = {id(sub) for block in _skipped_blocks(tree) for sub in ast.walk(block)}
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in skipped:
                edges |= _targets(module, path, node, modules)
        graph[module] = edges - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    cycles = _cycles(graph)
    described = [", ".join(f"{a} -> {b}" for a in cycle for b in sorted(graph[a]) if b in cycle) for cycle in cycles]
    assert not cycles, "import circles:\n" + "\n".join(described)


def test_the_checker_sees_lazy_imports_and_circles():
    """The checker itself: a lazy import inside a function is an edge, and a circle through it is found."""
    graph = import_graph()
    assert "cifar_train.loop" in graph["cifar_train.cli"]  # imported inside a function in cli.py
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_schema_imports_nothing_above_it():
    """The schema is the bottom of the recipe stack: only errors (and what errors needs) below it."""
    graph = import_graph()
    assert graph["cifar_train.schema"] <= {"cifar_train.errors"}
