"""The package's shape: the core flows one way, the registry is a leaf, and no import circle exists."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "megaspec"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """megaspec module -> the megaspec modules it imports, at any depth of its code (inside functions too)."""
    files = {_module_name(f): f for f in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        edges: set[str] = set()
        package = name if file.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `from pkg import name`: the module, or pkg itself
                    target = target.rpartition(".")[0]
                if target.startswith("megaspec") and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph()


def test_graph_sees_imports_inside_functions() -> None:
    # cli.py imports its commands lazily, inside functions.
    assert {"megaspec.build_report", "megaspec.validate"} <= GRAPH["megaspec.cli"]


def test_no_import_circle() -> None:
    assert cycles(GRAPH) == []


def test_registry_is_a_leaf() -> None:
    assert GRAPH["megaspec.registry"] == {"megaspec.config", "megaspec.errors", "megaspec.kinds"}
    assert GRAPH["megaspec.kinds"] == set() and GRAPH["megaspec.config"] <= {"megaspec.rope"}
    assert GRAPH["megaspec.rope"] == set()


@pytest.mark.parametrize("module", ["megaspec.build", "megaspec.resolve", "megaspec.spec", "megaspec.configs"])
def test_the_core_does_not_reach_up(module: str) -> None:
    """The builder knows nothing of Hydra, checkpoints or the entry points above it."""
    above = {"megaspec.compose", "megaspec.checkpoint", "megaspec.inputs", "megaspec.cli", "megaspec.interop.hf"}
    assert not GRAPH[module] & above


def test_only_the_catalog_names_the_builtins() -> None:
    importers = {m for m, edges in GRAPH.items() if any(e.startswith(("megaspec.modules.", "megaspec.models.gpt"))
                                                        for e in edges)}
    assert "megaspec.registry" not in importers and "megaspec.build" not in importers
    assert GRAPH["megaspec.modules"] == set() and GRAPH["megaspec.modules.moe"] == set()


def test_parallel_imports_no_model_family() -> None:
    parallel = {m: edges for m, edges in GRAPH.items() if m.startswith("megaspec.parallel")}
    assert parallel and not any(e.startswith("megaspec.models") for edges in parallel.values() for e in edges)
