"""The package's import graph: layers point one way and no modules import each other."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "echomoe"

KNOWN_CYCLES = [
    # pixels.read_grayscale hands a DICOM file to formats.dicom.read_dicom (a lazy import),
    # which decodes with pixels' converters.
    {"echomoe.data.formats.dicom", "echomoe.data.formats.errors", "echomoe.data.pixels",
     "echomoe.data.schema"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> echomoe modules it imports anywhere (lazy imports included); edges into a
    package ``__init__`` are left out (a re-export is not a dependency of the package)."""
    modules = _modules()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("echomoe"):
                for alias in node.names:
                    deps.add(resolve(f"{node.module}.{alias.name}"))
            elif isinstance(node, ast.Import):
                deps.update(resolve(a.name) for a in node.names if a.name.startswith("echomoe"))
        graph[name] = {d for d in deps - {name, None} if modules[d].name != "__init__.py"}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read():
    graph = _graph()
    assert "echomoe.train.strategy" in graph["echomoe.train.loop"]
    assert "echomoe.distributed.runtime" in graph["echomoe.train.strategy"]


def test_no_import_cycles():
    cycles = [c for c in _cycles(_graph()) if c not in KNOWN_CYCLES]
    assert not cycles, f"modules importing each other: {cycles}"


@pytest.mark.parametrize("lower, upper", [("distributed", "train"), ("moe", "train"),
                                          ("moe", "models"), ("config", "train")])
def test_layers_point_one_way(lower, upper):
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d.startswith(f"echomoe.{upper}"))
                 for m, deps in graph.items() if m.startswith(f"echomoe.{lower}")}
    assert not {m: d for m, d in offenders.items() if d}, offenders
