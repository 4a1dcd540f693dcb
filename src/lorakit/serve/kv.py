"""The running batch's KV cache for continuous batching: left padding, joined and split by rows.

Layout (chosen over per-request caches stacked into a batch at every step, which would copy the
whole cache once per decode step): one transformers ``DynamicCache`` for the running batch, its
keys/values (B, heads, L, head_dim) left-padded so that every row ends at column L; a 2-D
attention mask (B, L) marks the real columns; each row keeps its own next position id. This is
what ``generate`` does for a left-padded batch, so the model's own masking and RoPE apply unchanged.

- **join**: the newcomers are prefilled together in their own cache; then both caches are
  left-padded to the longer one and concatenated along the batch (one copy per join, not per step).
- **leave**: finished rows are dropped with one ``index_select``; the columns that are now padding
  in every row are cut from the left, so the cache never stays longer than its longest row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class BatchCache:
    """Cache + mask + positions of the rows in flight (row order = the engine's row order)."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor, positions: torch.Tensor) -> None:
        self.cache = cache  # keys/values (B, H, L, D) per layer
        self.mask = mask  # (B, L) long: 1 = a real token
        self.positions = positions  # (B,) long: the position id of each row's next token

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask (B, L+1) and position ids (B, 1) for a one-token decode step."""
        mask = F.pad(self.mask, (0, 1), value=1)
        return mask, self.positions.unsqueeze(1)

    def advance(self, mask: torch.Tensor) -> None:
        """After a decode step: the step's mask is the cache's, positions move on."""
        self.mask = mask
        self.positions = self.positions + 1

    def select(self, keep: list[int]) -> None:
        """Keep rows ``keep`` (in that order), then cut all-padding columns on the left."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self._compact()

    def _compact(self) -> None:
        used = self.mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else self.length
        if first == 0:
            return
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
        self.mask = self.mask[:, first:]

    def join(self, other: BatchCache) -> None:
        """Append ``other``'s rows after ours (both left-padded to the longer cache)."""
        length = max(self.length, other.length)
        for mine, theirs in zip(self.cache.layers, other.cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, length), _left_pad(theirs.keys, length)])
            mine.values = torch.cat([_left_pad(mine.values, length), _left_pad(theirs.values, length)])
        self.mask = torch.cat([_left_pad_mask(self.mask, length), _left_pad_mask(other.mask, length)])
        self.positions = torch.cat([self.positions, other.positions])


def prefill_inputs(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Left-padded ``input_ids``, ``attention_mask`` and ``position_ids`` (B, L) for ``prompts``."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, length - len(prompt):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return t if t.shape[2] == length else F.pad(t, (0, 0, length - t.shape[2], 0))


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    return mask if mask.shape[1] == length else F.pad(mask, (length - mask.shape[1], 0))
