"""The package's layers point one way, and only ``tread_scale/compat/`` reaches into Composer's or streaming's internals."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import composer
import pytest
import streaming

PACKAGE = Path(__file__).resolve().parents[1] / "tread_scale"


def _modules(under: Path = PACKAGE):
    for path in sorted(under.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imports(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def _private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def _defined_private_names(root: Path) -> set[str]:
    """Private names a code base defines: ``def _x``, ``class _X``, ``self._x = ...``, ``_X = ...``."""
    names = set()
    for path in root.rglob("*.py"):
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _private(node.name):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _private(node.attr):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _private(node.id):
                names.add(node.id)
    return names


def test_no_private_attribute_of_composer_or_streaming_outside_compat():
    theirs = _defined_private_names(Path(composer.__file__).parent) | _defined_private_names(
        Path(streaming.__file__).parent)
    ours = _defined_private_names(PACKAGE)
    found = []
    for path, tree in _modules():
        if path.is_relative_to(PACKAGE / "compat"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("composer", "streaming"):
                found += [f"{path.relative_to(PACKAGE)}:{node.lineno} imports {a.name}" for a in node.names
                          if _private(a.name)]
            elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr in theirs \
                    and node.attr not in ours:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} uses .{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" \
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str) and _private(node.args[1].value) \
                    and node.args[1].value in theirs and node.args[1].value not in ours:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} getattr {node.args[1].value}")
    assert not found, "move these into tread_scale/compat/:\n" + "\n".join(found)


@pytest.mark.parametrize("package,forbidden", [
    ("models", ("composer", "streaming", "tread_scale.config", "tread_scale.trainer", "tread_scale.data")),
    ("routing", ("composer", "streaming", "tread_scale.config", "tread_scale.trainer", "tread_scale.models")),
    ("diffusion", ("composer", "streaming", "tread_scale.config", "tread_scale.trainer")),
    ("parallel", ("composer", "tread_scale.trainer")),
])
def test_layers_point_one_way(package, forbidden):
    bad = [f"{path.relative_to(PACKAGE)} imports {name}" for path, tree in _modules(PACKAGE / package)
           for name in _imports(tree) if name.startswith(forbidden)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module,library", [("tread_scale.compat.composer", "composer"),
                                            ("tread_scale.compat.streaming", "streaming"),
                                            ("tread_scale.compat.deepspeed", "deepspeed"),
                                            ("tread_scale.compat.torch", "torch")])
def test_compat_refuses_another_library_version(module, library, monkeypatch):
    importlib.import_module(module)
    library = importlib.import_module(library)
    monkeypatch.setattr(library, "__version__", "9.9.9")
    monkeypatch.delitem(sys.modules, module)
    with pytest.raises(ImportError, match=r"written for .* but 9\.9\.9 is installed"):
        importlib.import_module(module)
