"""The batched multi-adapter LoRA embedding: one lookup of the base table, each row's update by its slot.

::

    ids (B, T) ──► E[ids] (frozen) ──────────────────────────────────────────┐
    │                                                                          + ──► (B, T, dim)
    └──► Aᵀ[slot, ids] (B, T, r) ──► bmm (s·Bᵀ)[slot] (B, r, dim) ─────────────┘

PEFT's embedding LoRA (``lora_embedding_A`` (r, vocab), ``lora_embedding_B`` (dim, r)) adds
``s · (A[:, ids])ᵀ Bᵀ`` to the looked-up rows. Here the tables are per slot, ``Aᵀ`` as
(slots, vocab, R) and ``s·Bᵀ`` as (slots, R, dim), zero-padded to the common rank ``R`` like
:class:`~lorakit.serve.layers.BatchedLoraLinear`. Each row gathers its own tokens' rank-r codes from
its slot (one ``index_select`` over the flattened table) and one ``bmm`` expands them: an embedding
update is a lookup, so there is nothing to group. The tables are allocated at the first adapter that
adapts the embedding (``vocab × R`` per slot), so a server without embedding adapters pays nothing.

Scaled embeddings (Gemma's ``embed_scale``, applied in the embedding's forward) scale the update
too, as :class:`~lorakit.adapters.lora.LoraEmbedding` does, so serving equals the merged model.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.serve.layers import SlotContext


class BatchedLoraEmbedding(nn.Module):
    """A frozen ``nn.Embedding`` plus slot tables of embedding LoRA adapters.

    ``in_features`` is the vocabulary and ``out_features`` the embedding width, so that the
    registry checks ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B`` (dim, r) exactly as
    it checks a linear layer's ``lora_A`` (r, in) and ``lora_B`` (out, r).
    """

    def __init__(self, base_layer: nn.Embedding, num_slots: int, max_rank: int, context: SlotContext,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.weight.shape
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.register_buffer("lora_At", None, persistent=False)  # (slots, vocab, R)
        self.register_buffer("lora_Bt", None, persistent=False)  # (slots, R, dim), s folded in
        self.filled: set[int] = set()
        self.context = context

    # What callers of ``model.get_input_embeddings()`` read, from the base table.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def num_embeddings(self) -> int:
        return self.in_features

    @property
    def embedding_dim(self) -> int:
        return self.out_features

    @property
    def padding_idx(self) -> int | None:
        return self.base_layer.padding_idx

    @torch.no_grad()
    def write_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
                   scale: torch.Tensor | None = None) -> None:
        """Put ``A`` (r, vocab) and ``s·B`` (dim, r) into ``slot`` (None: this adapter skips the embedding)."""
        if scale is not None:
            raise ValueError("DoRA has no per-slot scaling on an embedding")  # the registry refuses it first
        if A is None:
            self.filled.discard(slot)
            if self.lora_At is not None:
                self.lora_At[slot].zero_()
                self.lora_Bt[slot].zero_()
            return
        if self.lora_At is None:
            device = self.base_layer.weight.device
            self.lora_At = torch.zeros(self.num_slots, self.in_features, self.max_rank, dtype=self.dtype,
                                       device=device)
            self.lora_Bt = torch.zeros(self.num_slots, self.max_rank, self.out_features, dtype=self.dtype,
                                       device=device)
        r = A.shape[0]
        self.lora_At[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.lora_At[slot, :, :r].copy_(A.T)
        self.lora_Bt[slot, :r].copy_((B.float() * scaling).T)
        self.filled.add(slot)

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(ids, *args, **kwargs)
        plan = self.context.plan
        if plan is None or self.filled.isdisjoint(plan.slot_list):
            return out
        rows, r = plan.rows, plan.rank
        flat = self.lora_At.view(-1, self.max_rank)  # (slots·vocab, R)
        index = plan.row_slots[:, None] * self.in_features + ids.reshape(rows, -1)  # (B, T)
        h = flat.index_select(0, index.reshape(-1)).view(rows, -1, self.max_rank)[:, :, :r]  # (B, T, r)
        Bt = self.lora_Bt.index_select(0, plan.row_slots)[:, :r]  # (B, r, dim): one small copy per row
        update = torch.bmm(h, Bt) * plan.row_mask.to(h.dtype)  # rows without an adapter add zeros
        embed_scale = getattr(self.base_layer, "embed_scale", None)
        if embed_scale is not None:
            update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
        return out + update.view(out.shape).to(out.dtype)

    def extra_repr(self) -> str:
        return f"vocab={self.in_features}, dim={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
