"""Who runs next: the engine-side state of a request, and admission from the waiting queue.

Each step the engine admits waiting requests, first in line first, while the batch has room
(``max_batch`` running), the prefill stays within ``max_prefill_tokens`` padded prompt tokens (at
least one request is always admitted) and an adapter slot can be pinned. A request whose adapter
cannot be made resident (every slot pinned) stays first in line; one whose adapter was unloaded
meanwhile fails alone.

Admission also looks the prompt up in the prefix cache (:mod:`lorakit.serve.prefix_cache`), under
the version of the adapter its slot holds, and applies one rule for shared prefixes: a prompt
whose start — at least :data:`SHARE_MIN_TOKENS` tokens not cached yet — is shared with a prompt
admitted at this step waits one step (once at most). The prompt admitted now caches that start,
so it is computed once: the choices of a multiple-choice question that arrive together, the
requests of ``n > 1``, many chats with one system prompt.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import torch

from lorakit.serve.prefix_cache import Match, PrefixCache, common_length
from lorakit.serve.registry import AdapterNotFoundError, AdapterRegistry, AdapterSlotsBusyError
from lorakit.serve.requests import Completion, RequestHandle
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.text import TextStream

SHARE_MIN_TOKENS = 16  # an uncached start shared with an admitted prompt worth waiting a step for


class Request:
    """Engine-side state of one request."""

    def __init__(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams,
                 stream: TextStream, device: torch.device) -> None:
        self.handle = handle
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = stream
        self.slot: int | None = None  # pinned adapter slot once admitted
        self.key = 0  # the version of the adapter in that slot (the prefix cache's key)
        self.match: Match | None = None  # its cached prefix, from admission to prefill
        self.deferred = False  # waited a step once already for a shared prefix
        self.generator = torch.Generator(device=device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()
        self.tokens: list[int] = []

    @property
    def completion(self) -> Completion:
        return self.handle.completion


class Admission:
    """The admission policy of one engine (its registry, prefix cache and limits)."""

    def __init__(self, registry: AdapterRegistry, cache: PrefixCache, max_batch: int, max_prefill_tokens: int) -> None:
        self.registry, self.cache = registry, cache
        self.max_batch, self.max_prefill_tokens = max_batch, max_prefill_tokens

    def admit(self, waiting: deque[Request], running: int,
              finish: Callable[[Request, str, Exception | None], None]) -> list[Request]:
        """Take the requests that start now from ``waiting`` (the caller holds the engine's lock).

        ``finish(request, reason, error)`` ends those that cannot run: cancelled, or their adapter gone.
        """
        admitted: list[Request] = []
        deferred: list[Request] = []
        longest = 0
        while waiting and running + len(admitted) < self.max_batch:
            request = waiting[0]
            if request.handle.cancelled:
                waiting.popleft()
                finish(request, "cancelled", None)
                continue
            if self._waits_for_shared_prefix(request, admitted):
                deferred.append(waiting.popleft())
                continue
            length = max(longest, len(request.prompt_ids))
            if admitted and length * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            try:
                request.slot = self.registry.acquire(request.handle.adapter)
            except AdapterSlotsBusyError:
                break  # stays first in line until a running request frees a slot
            except AdapterNotFoundError as err:  # unloaded after submit: fails alone
                waiting.popleft()
                finish(request, "error", err)
                continue
            waiting.popleft()
            request.key = self.registry.slot_version(request.slot)  # stable while the slot is pinned
            if self.cache.max_bytes > 0:  # at least the last prompt token is computed: its logits are needed
                request.match = self.cache.match(request.key, request.prompt_ids, len(request.prompt_ids) - 1)
            admitted.append(request)
            longest = length
        waiting.extendleft(reversed(deferred))  # first in line again, in their order
        return admitted

    def _waits_for_shared_prefix(self, request: Request, admitted: list[Request]) -> bool:
        if request.deferred or not admitted or self.cache.max_bytes <= 0:
            return False
        prompt, adapter = request.prompt_ids, request.handle.adapter
        shared = max((common_length(prompt, other.prompt_ids) for other in admitted
                      if other.handle.adapter == adapter), default=0)
        shared = min(shared, len(prompt) - 1)
        if shared < SHARE_MIN_TOKENS:
            return False
        try:
            key = self.registry.version(adapter)
        except AdapterNotFoundError:
            return False
        cached = self.cache.match(key, prompt, shared, count=False).length
        request.deferred = shared - cached >= SHARE_MIN_TOKENS
        return request.deferred
