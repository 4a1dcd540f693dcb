"""One prefill forward: the prompts admitted at a step, each after its cached prefix, in one batch.

Row ``i`` has ``c_i`` tokens found in the :class:`~lorakit.serve.prefix_cache.PrefixCache` and
``m_i = n_i − c_i ≥ 1`` to compute (at least its last token: its logits pick the first new token).
With ``P = max c`` and ``M = max m`` the batch is laid out as

::

    columns   [ pad … | cached prefix (c_i) ][ pad … | new tokens (m_i) ]
              └──── past keys/values (P) ───┘└──── input_ids (M) ────────┘
    position   -        0 … c_i − 1            -      c_i … n_i − 1

the cached keys/values as the forward's past (a ``DynamicCache``), one 2-D attention mask over both
parts and explicit position ids, so the model's own masking and RoPE apply to padding in the
middle as to left padding. The result joins the running batch as it is (:mod:`lorakit.serve.kv`).

Each row's adapter applies to every layer (one grouped plan for the batch), then:

- the next-token logits are the head applied to each row's last position;
- rows that asked for prompt logprobs get them from their hidden states — the cached ones from the
  prefix cache, the new ones from this forward — through the head again, with a one-row plan for
  their adapter (the head's LoRA, where an adapter has one, counts too);
- every row's new keys/values and hidden states go into the prefix cache, under its adapter.

Without a verified backbone/head split (:class:`~lorakit.serve.head.OutputHead`) the model runs
whole (``logits_to_keep=1``), no hidden states are kept, and prompt logprobs are not offered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.serve.head import OutputHead
from lorakit.serve.kv import BatchCache, prefill_inputs
from lorakit.serve.layers import LoraBatch
from lorakit.serve.logprobs import TokenLogprob, of_prompt
from lorakit.serve.prefix_cache import Match, PrefixCache
from lorakit.serve.registry import AdapterRegistry


@dataclass
class PrefillRow:
    """One admitted prompt."""

    prompt: list[int]
    slot: int  # its adapter's slot
    key: int  # its adapter's version: the prefix cache's key
    prompt_logprobs: int | None = None  # alternatives per prompt position; None: no prompt logprobs
    match: Match | None = None  # its cached prefix


@dataclass
class PrefillResult:
    logits: torch.Tensor  # (B, vocab): each row's next-token logits
    batch: BatchCache  # the rows' cache, mask and next positions
    prompt_logprobs: list[list[TokenLogprob | None] | None]  # per row, when asked


class Prefiller:
    """Runs prefills for one engine: its model, adapter slots, head split and prefix cache."""

    def __init__(self, model: nn.Module, registry: AdapterRegistry, head: OutputHead | None,
                 cache: PrefixCache, pad_id: int, device: torch.device, strategy: str) -> None:
        self.model, self.registry, self.head, self.cache = model, registry, head, cache
        self.pad_id, self.device, self.strategy = pad_id, device, strategy

    def plan(self, slots: list[int]) -> LoraBatch | None:
        return LoraBatch.build(slots, self.registry.slot_ranks(), self.registry.max_resident, self.device,
                               self.strategy)

    def run(self, rows: list[PrefillRow]) -> PrefillResult:
        cached = [row.match.length if row.match is not None else 0 for row in rows]
        pasts = [self.cache.past(row.match) if c else None for row, c in zip(rows, cached)]
        ids, mask, positions = prefill_inputs([row.prompt[c:] for row, c in zip(rows, cached)], self.pad_id,
                                              self.device)
        positions = positions + torch.tensor(cached, device=self.device)[:, None]
        cache, mask = self._past(pasts, cached, mask)
        context = self.registry.context
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        hidden = None
        with context.using(self.plan([row.slot for row in rows])):
            if self.head is not None:
                hidden = self.head.hidden(**inputs)  # (B, M, d)
                logits = self.head.logits(hidden[:, -1])
            else:
                logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]
        width, length = ids.shape[1], mask.shape[1]
        prompt_logprobs: list[list[TokenLogprob | None] | None] = []
        for i, row in enumerate(rows):
            new = len(row.prompt) - cached[i]
            mine = None if hidden is None else hidden[i, width - new:]  # (m_i, d)
            if row.prompt_logprobs is None or mine is None:
                prompt_logprobs.append(None)
            else:
                if pasts[i] is not None:
                    mine = torch.cat([pasts[i][1], mine])  # (n_i, d): the cached prefix's states first
                with context.using(self.plan([row.slot])):
                    prompt_logprobs.append(of_prompt(self.head.logits, mine, row.prompt, row.prompt_logprobs))
            kv = [(layer.keys[i, :, length - new:], layer.values[i, :, length - new:]) for layer in cache.layers]
            self.cache.insert(row.key, row.prompt, cached[i], kv, None if hidden is None else hidden[i, width - new:])
        return PrefillResult(logits, BatchCache(cache, mask, positions[:, -1] + 1), prompt_logprobs)

    def _past(self, pasts, cached: list[int], new_mask: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
        """The rows' cached keys/values, left-padded to the longest (B, heads, P, head_dim) per layer,
        as the forward's past, and the attention mask over past + new columns."""
        longest = max(cached)
        if not longest:
            return DynamicCache(), new_mask
        rows = len(cached)
        past_mask = torch.zeros(rows, longest, dtype=new_mask.dtype, device=self.device)
        template = next(p for p in pasts if p is not None)[0]
        layers = []
        for layer, (k0, v0) in enumerate(template):
            keys = k0.new_zeros(rows, k0.shape[0], longest, k0.shape[2])
            values = v0.new_zeros(rows, v0.shape[0], longest, v0.shape[2])
            for i, (past, c) in enumerate(zip(pasts, cached)):
                if past is not None:
                    keys[i, :, longest - c:] = past[0][layer][0]
                    values[i, :, longest - c:] = past[0][layer][1]
            layers.append((keys, values))
        for i, c in enumerate(cached):
            past_mask[i, longest - c:] = 1
        return DynamicCache(ddp_cache_data=layers), torch.cat([past_mask, new_mask], dim=1)
