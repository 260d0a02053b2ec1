"""The package layout: every import arrow between rxt's packages points one way.

Parsed from the source (every ``import``/``from ... import`` in a file, including the lazy ones
inside functions and the ``TYPE_CHECKING`` ones: a dependency is a dependency whenever it
runs), so the test needs no import of rxt itself and fails on the file that adds a bad arrow.
A "package" is a top-level entry of ``src/rxt``: a subpackage (``model``, ``engine`` ...) or a
single module (``config``, ``tokenizer``, ``cli`` ...).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "rxt"

# (from, to): arrows the layout forbids, besides any cycle. A package that builds the model
# must not know how it is served, trained or measured; the engine runs a trained model and
# knows nothing of training or serving; serving never trains.
FORBIDDEN = {
    "model": ("engine", "training", "serve", "eval", "bench", "demo", "cli"),
    "engine": ("training", "serve", "eval", "demo", "cli"),
    "training": ("serve", "cli"),
    "serve": ("training", "demo", "cli", "bench"),
    "data": ("model", "engine", "training", "serve", "eval", "bench", "demo", "cli"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> set[str]:
    """Absolute names of the rxt modules ``path`` imports."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            elif node.module:
                found.add(node.module)
    return {n for n in found if n == "rxt" or n.startswith("rxt.")}


def _package(module: str) -> str | None:
    """Top-level package of an rxt module name (None for ``rxt`` itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_graph() -> dict[str, dict[str, list[str]]]:
    """``{from package: {to package: [files that import it]}}``, self-arrows left out."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(SRC.rglob("*.py")):
        source = _package(_module_name(path))
        for module in _imported(path):
            target = _package(module)
            if source and target and target != source:
                graph[source][target].append(str(path.relative_to(SRC)))
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_parser_sees_known_arrows():
    # Guards the test itself: a parser that found nothing would pass every check below.
    graph = package_graph()
    assert "model" in graph["engine"]
    assert "engine" in graph["serve"]
    assert "eval" in graph["training"]  # a lazy import inside a function counts
    assert {"model", "training", "demo", "serve"} <= set(graph)


def test_cycles_are_found():
    toy = {"a": {"b": ["a.py"]}, "b": {"c": ["b.py"]}, "c": {"a": ["c.py"]}, "d": {"a": ["d.py"]}}
    assert cycles(toy) == [["a", "b", "c"]]
    assert cycles({"a": {"b": ["a.py"]}}) == []


def test_no_package_cycles():
    graph = package_graph()
    found = cycles(graph)
    detail = [
        f"{a} -> {b}: {', '.join(graph[a][b])}"
        for component in found
        for a in component
        for b in component
        if b in graph.get(a, {})
    ]
    assert not found, "package cycles " + str(found) + ":\n" + "\n".join(detail)


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_arrows_point_one_way(source):
    assert (SRC / source).is_dir(), f"src/rxt/{source} is gone: update FORBIDDEN"
    arrows = package_graph().get(source, {})
    bad = {t: files for t, files in arrows.items() if t in FORBIDDEN[source]}
    assert not bad, f"{source} must not import {sorted(bad)}: " + "; ".join(
        f"{t} from {', '.join(files)}" for t, files in sorted(bad.items())
    )


def test_nn_imports_nothing_else_from_rxt():
    # The building blocks take their own small configs: the model sizes them (model/blocks.py).
    assert (SRC / "nn").is_dir(), "src/rxt/nn is gone: update this test"
    arrows = package_graph().get("nn", {})
    assert "model" in package_graph() and "nn" in package_graph()["model"]  # the parser sees it
    assert not arrows, "nn must import only rxt.nn: " + "; ".join(
        f"{t} from {', '.join(files)}" for t, files in sorted(arrows.items())
    )


MAX_LINES = 450  # a file longer than this holds more than one responsibility: split it


def test_no_file_is_too_long():
    long = {
        str(p.relative_to(SRC)): n
        for p in sorted(SRC.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines (split them by responsibility): {long}"
