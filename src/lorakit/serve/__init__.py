"""Serving: the multi-adapter inference engine (:mod:`lorakit.serve.engine`) and the
OpenAI-compatible HTTP server over it (:mod:`lorakit.serve.http`, ``lorakit serve``).

``from lorakit.serve import Engine, SamplingParams`` imports torch and transformers on first use
only, so ``lorakit --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the lazy table below, for type checkers and editors (tests/test_lazy_exports.py)
    from lorakit.serve.asgi import BackgroundServer as BackgroundServer
    from lorakit.serve.engine import ContextLengthExceededError as ContextLengthExceededError, Engine as Engine
    from lorakit.serve.http import create_app as create_app
    from lorakit.serve.logprobs import TokenLogprob as TokenLogprob
    from lorakit.serve.prefix_cache import PrefixCache as PrefixCache
    from lorakit.serve.registry import (
        AdapterInfo as AdapterInfo, AdapterNotFoundError as AdapterNotFoundError, AdapterRegistry as AdapterRegistry,
        AdapterSlotsBusyError as AdapterSlotsBusyError,
    )
    from lorakit.serve.requests import (
        Completion as Completion, RequestHandle as RequestHandle, TokenEvent as TokenEvent,
    )
    from lorakit.serve.sampling import SamplingParams as SamplingParams

DEFAULT_MAX_QUEUE = 256
"""Requests the HTTP server lets wait beyond the engine's batch before answering 429."""
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
"""Largest request body the HTTP server reads (413 above)."""
DEFAULT_PREFIX_CACHE_BYTES = 1 << 30
"""Memory for the engine's cached prompt prefixes (keys/values and last hidden states), 1 GiB."""

_LAZY = {
    "Engine": "lorakit.serve.engine",
    "ContextLengthExceededError": "lorakit.serve.engine",
    "SamplingParams": "lorakit.serve.sampling",
    "TokenLogprob": "lorakit.serve.logprobs",
    "PrefixCache": "lorakit.serve.prefix_cache",
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


__getattr__ = lazy_exports(__name__, _LAZY)
