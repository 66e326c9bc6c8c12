"""The package's layers, read from its source: every import (at the top of a module or inside a function)
runs downward, in this order, so that any layer can be used, tested and changed without the ones above it."""

from __future__ import annotations

import ast
from pathlib import Path

import cxrlearn

PACKAGE = Path(cxrlearn.__file__).parent

#: Lowest first. A module may import its own layer and the layers listed before it.
LAYERS = [
    ("core", ["cxrlearn", "cxrlearn.findings", "cxrlearn.errors", "cxrlearn.defaults", "cxrlearn._files",
              "cxrlearn.configs"]),
    ("data", ["cxrlearn.data"]),
    ("model", ["cxrlearn.model"]),
    ("inference", ["cxrlearn.inference"]),
    ("evaluation", ["cxrlearn.evaluation"]),
    ("training", ["cxrlearn.training"]),
    ("workflows", ["cxrlearn.workflows"]),
    ("serving", ["cxrlearn.serving"]),
    ("cli", ["cxrlearn.cli"]),
]


def layer_of(module: str) -> int:
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    assert rank is not None, f"{module} is in no layer: add it to LAYERS"
    return rank


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str) -> list[tuple[str, int]]:
    """(imported cxrlearn module, line) for every import in the file, relative ones resolved."""
    found = []
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("cxrlearn")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("cxrlearn"):
                found.append((target, node.lineno))
    return found


def test_imports_only_run_downward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        own = layer_of(name)
        for target, line in imports(path, name):
            if target == "cxrlearn" and name != "cxrlearn":
                continue  # the package's version and public names, read lazily
            if layer_of(target) > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[own][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert upward == [], "imports that run upward:\n" + "\n".join(upward)


def test_every_module_is_in_a_layer_and_the_layers_are_folders():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    named = {prefix.split(".")[1] for _, prefixes in LAYERS for prefix in prefixes if prefix.count(".") == 1}
    assert folders <= named | {"configs"}, folders - named
