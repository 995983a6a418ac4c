"""labkit's layers, enforced: every import (function-level ones included) runs down the layers, no two
modules import each other in a circle, and chapters never import each other.

ARCHITECTURE.md draws the same layers and says where new code goes.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "labkit"

LAYERS: list[tuple[str, list[str]]] = [
    ("foundations", ["labkit._version", "labkit.devices", "labkit.records"]),
    ("shapes data and weights", ["labkit.shapes", "labkit.shapes.*"]),
    ("model sources", ["labkit.models"]),
    ("optimizations", ["labkit.optimizations", "labkit.optimizations.*"]),
    ("measurement", ["labkit.measurement", "labkit.profiling", "labkit.quality", "labkit.doctor"]),
    ("scenarios", ["labkit.scenarios"]),
    ("shared tools", ["labkit.plots", "labkit.compare", "labkit.scale"]),
    ("book helpers", ["labkit.book"]),
    ("chapters", ["labkit.chapters", "labkit.chapters.*"]),
    ("training", ["labkit.training", "labkit.training.*"]),
    ("runner", ["labkit.runner"]),
    ("command line", ["labkit.cli"]),
    ("public API", ["labkit"]),
]
"""From the bottom up: a module may import its own layer and the layers below, never one above."""


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: Path) -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str], root: str) -> set[str]:
    """The package's modules that ``path`` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and (target == root or target.startswith(root + ".")) and target != name:
                found.add(target)
    return found


def layer_of(name: str, layers=LAYERS) -> int | None:
    for index, (_, patterns) in enumerate(layers):
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return index
    return None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(package: Path, layers=LAYERS) -> list[str]:
    """Everything wrong with the package's imports: unplaced modules, upward imports, chapter-to-chapter
    imports and circles."""
    found = modules(package)
    root = package.name
    graph = {name: imports(path, name, set(found), root) for name, path in found.items()}
    out = []
    for name in sorted(found):
        here = layer_of(name, layers)
        if here is None:
            out.append(f"{name} is in no layer: add it to LAYERS (and to ARCHITECTURE.md)")
            continue
        for target in sorted(graph[name]):
            there = layer_of(target, layers)
            if there is not None and there > here:
                out.append(
                    f"{name} ({layers[here][0]}) imports {target} ({layers[there][0]}): an upward import"
                )
            if name.startswith(f"{root}.chapters.") and target.startswith(f"{root}.chapters."):
                out.append(f"{name} imports {target}: chapters never import each other")
    out += [f"import circle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def test_every_import_runs_down_the_layers():
    assert problems(PACKAGE) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "labkit"
    for relative, text in files.items():
        path = package / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


def test_a_planted_upward_import_inside_a_function_is_caught(tmp_path):
    package = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "devices.py": "def f():\n    from labkit.book import judge\n",
            "book.py": "from labkit.devices import f\n",
        },
    )
    found = problems(package)
    assert any("labkit.devices (foundations) imports labkit.book (book helpers)" in p for p in found)
    assert any(p.startswith("import circle: labkit.book -> labkit.devices") for p in found)


def test_chapters_importing_each_other_and_unplaced_modules_are_caught(tmp_path):
    package = _plant(
        tmp_path,
        {
            "__init__.py": "",
            "chapters/__init__.py": "",
            "chapters/ch01_a.py": "from . import ch02_b\n",
            "chapters/ch02_b.py": "",
            "helpers.py": "",
        },
    )
    found = problems(package)
    assert "labkit.chapters.ch01_a imports labkit.chapters.ch02_b: chapters never import each other" in found
    assert any(p.startswith("labkit.helpers is in no layer") for p in found)


@pytest.mark.parametrize(
    "text", ["from . import records\n", "from .records import Store\n", "import labkit.records\n"]
)
def test_import_forms_resolve_to_modules(tmp_path, text):
    package = _plant(tmp_path, {"__init__.py": "", "records.py": "", "devices.py": text})
    assert imports(package / "devices.py", "labkit.devices", set(modules(package)), "labkit") == {
        "labkit.records"
    }
