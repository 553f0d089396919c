"""The package's import graph: no cycle (counting imports inside functions), and the data layers stay apart.

Every ``import`` statement counts, at module level or inside a function, because a function-level import
is how a cycle hides: it imports fine until the function runs in the wrong order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import tread_scale

ROOT = Path(tread_scale.__file__).parent


def module_files(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file under the package directory ``root``."""
    mods = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, from every import statement anywhere in it."""
    mods = module_files(root)
    top = root.name

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for name in targets:
                if name == top or name.startswith(top + "."):
                    target = owner(name)
                    if target and target != mod:
                        graph[mod].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_the_detector_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    return g\n")
    (pkg / "c.py").write_text("import os\n\ndef g():\n    import pkg.a\n")
    (pkg / "d.py").write_text("from pkg import a\n")
    graph = import_graph(pkg)
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (pkg / "c.py").write_text("def g():\n    pass\n")
    assert cycles(import_graph(pkg)) == []


def test_the_package_has_no_import_cycle():
    assert cycles(import_graph(ROOT)) == []


def test_the_data_layers_stay_apart():
    """Conversion and streaming only share the format (``data.metadata``) and object storage; neither knows
    the demo."""
    graph = import_graph(ROOT)
    for mod, targets in graph.items():
        if mod.startswith("tread_scale.data"):
            assert not any(t.startswith("tread_scale.devtools") for t in targets), (mod, targets)
        if mod.startswith("tread_scale.data.conversion"):
            assert not any(t.startswith("tread_scale.data.stream") for t in targets), (mod, targets)
        if mod.startswith("tread_scale.data.stream"):
            assert not any(t.startswith("tread_scale.data.conversion") for t in targets), (mod, targets)
        if mod in ("tread_scale.data.metadata", "tread_scale.data.object_store"):
            assert targets <= {"tread_scale.data.object_store", "tread_scale.errors"}, (mod, targets)
