"""Lazy package exports (PEP 562): names are imported on first use, so importing a package (and
``lorakit --help``) does not import torch.

Never export a name equal to one of the package's submodules: importing the submodule would
rebind the package attribute to the module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` serving ``table`` (exported name -> module that defines it)."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(table[name]), name)

    return __getattr__
