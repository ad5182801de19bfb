"""The library core knows nothing of the digits application: no module outside
``xpdiff/digits/`` imports from it (absolute or relative, at any depth of a function)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import xpdiff

PACKAGE_DIR = pathlib.Path(xpdiff.__file__).resolve().parent
APP = "xpdiff.digits"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def app_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of ``source`` (module ``module``) that reach into the application."""
    package = module if is_package else module.rpartition(".")[0]
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        else:
            continue
        if any(t == APP or t.startswith(APP + ".") for t in targets):
            hits.append(f"line {node.lineno}")
    return hits


@pytest.mark.parametrize(
    ("source", "module", "n"),
    [
        ("from xpdiff.digits import data", "xpdiff.training", 1),
        ("import xpdiff.digits.cli", "xpdiff.io", 1),
        ("from ..digits.data import prepare", "xpdiff.pipelines.sampling", 1),
        ("from .. import digits", "xpdiff.models.unet_2d", 1),
        ("def f():\n    from .digits import images", "xpdiff.io", 1),
        ("from . import backend, io\nfrom ..nn import init", "xpdiff.models.unet_2d", 0),
        ("from .data import prepare", "xpdiff.digits.cli", 1),
    ],
)
def test_app_import_checker(source, module, n):
    assert len(app_imports(source, module)) == n


def test_core_imports_nothing_from_the_digits_application():
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    core = [f for f in files if (PACKAGE_DIR / "digits") not in f.parents]
    assert PACKAGE_DIR / "backend.py" in core and len(core) > 20
    offenders = {}
    for path in core:
        hits = app_imports(
            path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
        )
        if hits:
            offenders[str(path.relative_to(PACKAGE_DIR.parent))] = hits
    assert not offenders, f"the library core imports the digits application: {offenders}"
