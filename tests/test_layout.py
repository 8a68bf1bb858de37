"""The package keeps the shape docs/ARCHITECTURE.md describes.

* no file under ``fxmerge/`` is longer than 600 lines, no function longer than 60;
* imports run downwards through the layers below (a stage never reaches back into
  a later one), and the import graph has no cycle.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fxmerge"
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 60

LAYERS = [
    # values and helpers every stage uses
    [
        "fxmerge.fxutil",
        "fxmerge.ir",
        "fxmerge.cache",
        "fxmerge.kernels",
        "fxmerge.activations",
        "fxmerge.ops",
        "fxmerge.report",
    ],
    # op recognisers, plans, exporting, process groups
    ["fxmerge.nodes", "fxmerge.patterns", "fxmerge.plan", "fxmerge.export", "fxmerge.distributed"],
    # capture and analysis
    [
        "fxmerge.capture",
        "fxmerge.passes",
        "fxmerge.passes.match",
        "fxmerge.passes.regions",
        "fxmerge.passes.spans",
        "fxmerge.passes.rules",
    ],
    # rewrites, tables, solver, training
    [
        "fxmerge.passes.linearize",
        "fxmerge.passes.merge",
        "fxmerge.solver",
        "fxmerge.latency",
        "fxmerge.latency.*",
        "fxmerge.data",
        "fxmerge.train",
    ],
    ["fxmerge.importance", "fxmerge.importance.*", "fxmerge.dynamo"],
    ["fxmerge.api", "fxmerge.loop"],
    # entry points
    ["fxmerge", "fxmerge.__main__", "fxmerge.cli", "fxmerge.cli.*", "fxmerge.demo"],
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _layer(module: str) -> int:
    for index, patterns in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"module {module} is in no layer of tests/test_layout.py; add it where it belongs")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_run_downwards_without_cycles():
    modules = _modules()
    graph = nx.DiGraph()
    upward = []
    for name, path in modules.items():
        graph.add_node(name)
        for target in _imports(name, path, set(modules)):
            if target == "fxmerge":  # the public API: only the entry points use it
                if _layer(name) < len(LAYERS) - 1:
                    upward.append(f"{name} imports the package root")
                continue
            graph.add_edge(name, target)
            if _layer(target) > _layer(name):
                upward.append(f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})")
    assert not upward, "imports that run upwards:\n" + "\n".join(sorted(upward))
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_and_functions_stay_short(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{path.name} has {source.count(chr(10))} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines in {path.name}: {long}"
