"""The packages' lazy export tables (``_LAZY``, PEP 562) and the ``if TYPE_CHECKING:`` imports
beside them, which make the same names visible to type checkers and editors, say the same thing;
every name exists where its table says."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import lorakit

SRC = Path(lorakit.__file__).resolve().parent


def lazy_packages() -> list[str]:
    """Every lorakit package whose ``__init__`` serves names through ``lazy_exports``."""
    found = []
    for init in sorted(SRC.rglob("__init__.py")):
        if "lazy_exports(" in init.read_text(encoding="utf-8"):
            found.append(".".join([SRC.name, *init.parent.relative_to(SRC).parts]))
    return found


def type_checking_imports(package: str) -> dict[str, str]:
    """Name -> module of the ``from M import name as name`` lines under ``if TYPE_CHECKING:``."""
    init = SRC.joinpath(*package.split(".")[1:], "__init__.py")
    names: dict[str, str] = {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for stmt in node.body:
                assert isinstance(stmt, ast.ImportFrom), f"{init}: only `from M import name as name` here"
                for alias in stmt.names:
                    assert alias.asname == alias.name, f"{init}: write `{alias.name} as {alias.name}` (a re-export)"
                    names[alias.name] = stmt.module
    return names


def test_the_lazy_packages_are_found():
    assert {"lorakit", "lorakit.data", "lorakit.evaluate", "lorakit.serve", "lorakit.train"} <= set(lazy_packages())


@pytest.mark.parametrize("package", lazy_packages())
def test_type_checkers_see_what_the_lazy_table_serves(package):
    module = importlib.import_module(package)
    assert type_checking_imports(package) == module._LAZY
    assert set(module._LAZY) <= set(module.__all__)
    for name, source in module._LAZY.items():
        assert getattr(module, name) is getattr(importlib.import_module(source), name), name


@pytest.mark.parametrize("package", lazy_packages())
def test_no_exported_name_is_also_a_submodule(package):
    # `import lorakit.merge` would rebind the attribute lorakit.merge (the function) to the module:
    # that is why the module defining merge() is lorakit/merging.py.
    folder = SRC.joinpath(*package.split(".")[1:])
    submodules = {p.stem for p in folder.glob("*.py")} | {p.parent.name for p in folder.glob("*/__init__.py")}
    module = importlib.import_module(package)
    assert not submodules & set(module._LAZY), f"{package}: exported names that are also submodules"
