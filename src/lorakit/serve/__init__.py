"""Serving: the multi-adapter inference engine (:mod:`lorakit.serve.engine`) and the
OpenAI-compatible HTTP server over it (:mod:`lorakit.serve.http`, ``lorakit serve``).

``from lorakit.serve import Engine, SamplingParams`` imports torch and transformers on first use
only, so ``lorakit --help`` stays instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Engine": "lorakit.serve.engine",
    "ContextLengthExceededError": "lorakit.serve.engine",
    "SamplingParams": "lorakit.serve.sampling",
    "AdapterRegistry": "lorakit.serve.registry",
    "AdapterInfo": "lorakit.serve.registry",
    "AdapterNotFoundError": "lorakit.serve.registry",
    "AdapterSlotsBusyError": "lorakit.serve.registry",
    "Completion": "lorakit.serve.requests",
    "RequestHandle": "lorakit.serve.requests",
    "TokenEvent": "lorakit.serve.requests",
    "create_app": "lorakit.serve.http",
    "BackgroundServer": "lorakit.serve.asgi",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorakit.serve' has no attribute {name!r}")
