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
              "cxrlearn.configs", "cxrlearn.settings", "cxrlearn.records"]),
    # data, from its lowest part up: the table's columns; decoding files; what an image becomes; the
    # datasets' own files; the split and statistics; the training pipeline; the package's own names.
    ("data.columns", ["cxrlearn.data.columns"]),
    ("data.decoding", ["cxrlearn.data.decoding"]),
    ("data.preprocessing", ["cxrlearn.data.preprocessing"]),
    ("data.sources", ["cxrlearn.data.sources"]),
    ("data.cohort", ["cxrlearn.data.cohort"]),
    ("data.pipeline", ["cxrlearn.data.pipeline"]),
    ("data", ["cxrlearn.data"]),
    ("model", ["cxrlearn.model"]),
    ("inference", ["cxrlearn.inference"]),
    ("evaluation", ["cxrlearn.evaluation"]),
    ("monitoring", ["cxrlearn.monitoring"]),
    ("training", ["cxrlearn.training"]),
    ("workflows", ["cxrlearn.workflows"]),
    ("dicom", ["cxrlearn.dicom"]),
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
    data = PACKAGE / "data"
    parts = {p.name for p in data.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    named = {prefix.split(".")[2] for _, prefixes in LAYERS for prefix in prefixes if prefix.count(".") == 2}
    assert parts <= named, parts - named


#: Imported where they are used, not at the top of a module: dependencies that are optional (DICOM, ONNX,
#: the service, figures, OpenCV for overlays) or that a command's start need not pay for.
OPTIONAL = {"pydicom", "onnx", "onnxruntime", "cv2", "matplotlib", "uvicorn", "fastapi", "ctypes", "mlflow", "psycopg",
            "openvino", "ray"}
#: The CLI imports the layers that need torch (about 1.5 s), and the DICOM ones (pydicom, highdicom, pynetdicom:
#: not on every machine that trains), inside the commands that use them, so that
#: ``cxrlearn --help``, ``split``, ``stats``, ``check``, ``prepare`` and ``download`` start without it.
CLI_DEFERRED = ("cxrlearn.model", "cxrlearn.inference.", "cxrlearn.evaluation", "cxrlearn.training",
                "cxrlearn.workflows", "cxrlearn.serving.app", "cxrlearn.dicom", "cxrlearn.monitoring",
                "cxrlearn.cli.shard_outputs", "pandas", "PIL")


def test_imports_sit_at_the_top_of_modules():
    inside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if not isinstance(node, (ast.Import, ast.ImportFrom)):
                    continue
                target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                if target.split(".")[0] in OPTIONAL:
                    continue
                if path.parent.name == "cli" and target.startswith(CLI_DEFERRED):
                    continue
                inside.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target} in {function.name}()")
    assert inside == [], "imports inside functions (move them to the top of the module):\n" + "\n".join(inside)


#: The longest a function in src/ may be: one screen, which a reader takes in whole. A longer one is several
#: steps that want names of their own.
MAX_FUNCTION_LINES = 80


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}() has {lines} lines")
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)


#: String-keyed accesses in src/ (``x["name"]``, ``x.get("name")``, ``.pop("name")``, ``.setdefault("name")``; not
#: FastAPI's ``app.get("/route")``): between layers values are typed records, so this count only falls. Lower it
#: when you remove some.
MAX_STRING_KEYED_ACCESSES = 203


def string_keyed_accesses() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            subscript = (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
                         and isinstance(node.slice.value, str))
            call = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("get", "pop", "setdefault") and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                    and not (isinstance(node.func.value, ast.Name) and node.func.value.id == "app"))  # routes
            if subscript or call:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    return found


def test_string_keyed_accesses_do_not_grow():
    found = string_keyed_accesses()
    assert len(found) <= MAX_STRING_KEYED_ACCESSES, (
        f"{len(found)} string-keyed accesses in src/, more than {MAX_STRING_KEYED_ACCESSES}: pass a typed record "
        "(a dataclass or a cxrlearn.records.Record) instead of a dict between layers")
    assert len(found) > MAX_STRING_KEYED_ACCESSES - 20, "fewer than the ceiling by far: lower MAX_STRING_KEYED_ACCESSES"
