"""The import rules of docs/design.md ("Layers") that import-linter cannot state.

import-linter (``lint-imports``, contracts in pyproject.toml) checks the layer order, cycles and imports of
``__main__``. What is left is read here from the source, by its syntax tree:

- no module imports another module's private name (``from x import _name``, ``import x._y``): a name with a
  leading underscore is its module's own; what others need is public and documented;
- a function-level import is only for an optional heavy dependency, named in OPTIONAL_HEAVY, whose import
  costs seconds or is absent from a plain install: everything else is imported at the top of the module,
  where a reader sees what the module depends on.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "data", "eval_mm", "train")
# Imported inside the function that needs them, each with a comment saying so: optional features whose import
# costs seconds (or needs a GPU stack) and that most runs never use.
OPTIONAL_HEAVY = (
    "gradio",
    "bitsandbytes",
    "deepspeed",
    "liger_kernel",
    "matplotlib",
    "wandb",
    "torch.utils.tensorboard",
    "open_clip",
    "datasets",
    "torchao",
    "models.fp8",
)  # models.fp8 imports torchao


def is_optional_heavy(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in OPTIONAL_HEAVY)


def package_files() -> list[Path]:
    return sorted(f for package in PACKAGES for f in (REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_ours(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, importer: str) -> list[str]:
    """``module: name`` for each private name ``importer`` imports from another module of ours."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and is_ours(node.module):
            if node.module != importer:
                found += [f"{node.module}: {a.name}" for a in node.names if is_private(a.name)]
        elif isinstance(node, ast.Import):
            found += [
                a.name for a in node.names if is_ours(a.name) and any(map(is_private, a.name.split(".")))
            ]
    return found


def function_level_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function body."""
    found = []
    for func in ast.walk(ast.parse(source)):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    found += [(node.lineno, a.name) for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    found.append((node.lineno, node.module or "."))
    return sorted(found)


def test_no_module_imports_a_private_name_of_another():
    violations = [
        f"{path.relative_to(REPO)}: {hit}"
        for path in package_files()
        for hit in private_imports(path.read_text(), module_name(path))
    ]
    assert violations == []


def test_function_level_imports_are_only_optional_heavy_dependencies():
    violations = [
        f"{path.relative_to(REPO)}:{line}: {module}"
        for path in package_files()
        for line, module in function_level_imports(path.read_text())
        if not is_optional_heavy(module)
    ]
    assert violations == []


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from train.freeze import _group_of, apply_freezing", ["train.freeze: _group_of"]),
        ("from train.freeze import (\n    apply_freezing,\n    _group_of,\n)", ["train.freeze: _group_of"]),
        ("import data._internal", ["data._internal"]),
        ("from torch._utils import ExceptionWrapper", []),  # not ours
        ("from train.freeze import __doc__, group_of", []),  # dunders and public names
    ],
)
def test_the_private_name_check_sees_what_it_should(source, expected):
    assert private_imports(source, importer="train.plan") == expected


def test_the_function_level_check_sees_nested_imports():
    source = "import os\n\ndef f():\n    if True:\n        from data.text import x\n    import deepspeed\n"
    assert function_level_imports(source) == [(5, "data.text"), (6, "deepspeed")]
