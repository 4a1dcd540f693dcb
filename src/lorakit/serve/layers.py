"""The batched multi-adapter LoRA layer: one base matmul for the batch, low-rank parts by adapter.

::

    x (B, T, in) ──► W (frozen) ─────────────────────────────────────────────────┐
    │                                                                             + ──► y
    └──► group rows by slot ──► bmm A[slot] (U, G·T, r) ──► bmm (s·B)[slot] ─────┘
         (U adapters in use, G rows per group, padded with a zero row)

Each row of the batch (one request) names an adapter *slot* or none. The slots are preallocated
per layer, ``A`` as (slots, R, in) and ``s·Bᵀ`` as (slots, R, out), ranks zero-padded to the common
``R`` (a zero row of A and column of B add nothing, so padding is exact). The scaling ``s`` is folded
into B when an adapter is written into its slot.

What is notable:

- The grouping is computed once per model forward (:class:`LoraBatch`), not per layer: in the
  usual case every layer then runs the same few tensor ops (gather x, two ``bmm``, ``index_add_``)
  whatever the number of adapters — no Python loop over requests inside the model.
- Only the adapters in use are read, and never copied. When their slots lie in a range no more
  than twice their number (the usual case: slots are handed out in order), the groups are laid
  over that range, the slot tables are sliced and two ``bmm`` serve every group (an unused slot in
  the range gets an empty group). Otherwise each group gets its own shrink and expand matmul on
  views of its slot: measured on SmolLM2 shapes (1 thread, batch 32), gathering the used slots with
  ``index_select`` cost 1.6x (8 adapters) to 2.4x (32) the per-group matmuls, because it copies
  their weights at every layer of every step.
- The rank is cut to the largest rank among the adapters in use, so a batch of r=4 adapters in an
  engine sized for r=64 does r=4 work.
- A batch where every row uses one adapter skips the grouping (two plain matmuls); a batch with no
  adapter at all, or none that adapts this layer (``filled``), runs the base layer alone.
- DoRA adapters: ``y = c ⊙ (W x + s·B A x) + b`` with ``c = m / ‖W + s·B A‖_row``, one (out,)
  vector per adapter and layer, computed once when the adapter is loaded (the registry). A slot
  holding one sets its row of ``lora_scale`` (slots + 1, out; fp32; allocated at the first DoRA
  write, the last row is ones for rows without an adapter). Only a batch that uses a DoRA slot takes the
  DoRA path: the base product without bias, the same low-rank update, then each row × its
  adapter's ``c`` (ones for plain LoRA and base rows), then the bias. Plain-LoRA batches run the
  code above unchanged.
- Alternative measured in ``benchmarks/serve_engine.py``: gathering A and B per *row*
  (``strategy="gather"``), which copies B·R·(in+out) weights per layer; the grouped form reads each
  adapter once per layer and wins as soon as two rows share an adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapters.layout import is_conv1d, matmul

NO_ADAPTER = -1


@dataclass
class LoraBatch:
    """How the rows of one forward map onto adapter slots (computed once, read by every layer).

    Attributes:
        rows: the batch size B.
        slots: (U,) the slot of each group, ascending (in a range: every slot of the range).
        rank: the largest rank among them (the work per token is cut to it).
        gather: (U·G,) for each group position the batch row it takes (row 0 for padding).
        pads: the padding positions of ``gather`` (zeroed after the gather), or None.
        scatter: (B,) for each row its position in the flattened groups, U·G = none (a zero row).
        groups: G, the largest number of rows that share one adapter.
        first: when the groups are the slot range ``first … first+U-1``: ``first`` (the tables are
            sliced and two ``bmm`` serve every group); else None (one matmul pair per group).
        uniform: every row uses the same adapter, slot ``uniform_slot`` (no grouping needed).
        row_slots: (B,) each row's slot (0 for rows without one), for the gather strategy.
        row_mask: (B, 1, 1) 1.0 for rows with an adapter, 0.0 without.
        strategy: "grouped" (default) or "gather" (per-row gathered weights; for the benchmark).
        slot_list: the group slots as Python ints (for the per-group path).
        scale_index: (B,) each row's row of a layer's ``lora_scale`` table (its slot; the ones row
            for rows without an adapter); filled by the first DoRA layer that needs it.
    """

    rows: int
    slots: torch.Tensor
    rank: int
    gather: torch.Tensor
    pads: torch.Tensor | None
    scatter: torch.Tensor
    groups: int
    first: int | None
    uniform: bool
    uniform_slot: int
    slot_list: list[int]
    row_slots: torch.Tensor
    row_mask: torch.Tensor
    strategy: str = "grouped"
    scale_index: torch.Tensor | None = None

    @classmethod
    def build(cls, row_slots: list[int], ranks: list[int], num_slots: int,
              device: torch.device | str = "cpu", strategy: str = "grouped") -> LoraBatch | None:
        """The plan for a batch whose row ``i`` uses slot ``row_slots[i]`` (``NO_ADAPTER``: none).

        Returns None when no row uses an adapter (the layers then run the base alone).
        """
        used = sorted({s for s in row_slots if s != NO_ADAPTER})
        if not used:
            return None
        rows = len(row_slots)
        members = {s: [i for i, r in enumerate(row_slots) if r == s] for s in used}
        groups = max(len(m) for m in members.values())
        span = used[-1] - used[0] + 1
        first = used[0] if span <= 2 * len(used) else None
        group_slots = list(range(used[0], used[-1] + 1)) if first is not None else used
        gather, scatter, pads = [], [len(group_slots) * groups] * rows, []
        for u, slot in enumerate(group_slots):
            for g in range(groups):
                if g < len(members.get(slot, ())):
                    row = members[slot][g]
                    gather.append(row)
                    scatter[row] = u * groups + g
                else:
                    pads.append(len(gather))
                    gather.append(0)  # any row: zeroed after the gather, so it adds nothing
        long = dict(dtype=torch.long, device=device)
        return cls(
            rows=rows,
            slots=torch.tensor(group_slots, **long),
            rank=max(ranks[s] for s in used),
            gather=torch.tensor(gather, **long),
            pads=torch.tensor(pads, **long) if pads else None,
            scatter=torch.tensor(scatter, **long),
            groups=groups,
            first=first,
            uniform=len(used) == 1 and len(members[used[0]]) == rows,
            uniform_slot=used[0],
            slot_list=group_slots,
            row_slots=torch.tensor([max(s, 0) for s in row_slots], **long),
            row_mask=torch.tensor([[[float(s != NO_ADAPTER)]] for s in row_slots], device=device),
            strategy=strategy,
        )


class SlotContext:
    """What every batched layer of one model shares: the plan of the forward now running."""

    def __init__(self) -> None:
        self.plan: LoraBatch | None = None

    @contextlib.contextmanager
    def using(self, plan: LoraBatch | None) -> Iterator[None]:
        """Run the forwards inside the ``with`` block under ``plan``."""
        self.plan = plan
        try:
            yield
        finally:
            self.plan = None


class BatchedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` (or transformers ``Conv1D``) plus slot tables of LoRA adapters.

    Buffers: ``lora_A`` (slots, R, in) and ``lora_Bt`` (slots, R, out) holding ``s·Bᵀ``.
    """

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, context: SlotContext,
                 in_features: int, out_features: int, dtype: torch.dtype, lazy: bool = False) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = in_features, out_features
        self.fan_in_fan_out = is_conv1d(base_layer)  # Conv1D stores W as (in, out)
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self.register_buffer("lora_A", None, persistent=False)
        self.register_buffer("lora_Bt", None, persistent=False)
        if not lazy:  # lazy (the output head: out = vocab): the tables appear at the first adapter write
            self._allocate()
        self.register_buffer("lora_scale", None, persistent=False)  # DoRA's c per slot: see write_slot
        self.filled: set[int] = set()  # slots whose adapter adapts this layer (the others add nothing)
        self.dora_slots: set[int] = set()  # slots whose adapter is DoRA on this layer
        self.context = context  # a plain object, not a module: shared by every layer

    @property
    def weight(self) -> torch.Tensor:  # what callers of ``model.get_output_embeddings()`` read
        return self.base_layer.weight

    def _allocate(self) -> None:
        device = self.base_layer.weight.device
        shape = (self.num_slots, self.max_rank)
        self.lora_A = torch.zeros(*shape, self.in_features, dtype=self.dtype, device=device)
        self.lora_Bt = torch.zeros(*shape, self.out_features, dtype=self.dtype, device=device)

    @torch.no_grad()
    def write_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float,
                   scale: torch.Tensor | None = None) -> None:
        """Put ``A`` (r, in) and ``s·B`` (out, r) into ``slot`` (None: this adapter skips the layer).

        ``scale``: a DoRA adapter's ``c = m / ‖W + s·B A‖_row`` (out,) on this layer, or None for
        plain LoRA. The (slots + 1, out) table is allocated at the first DoRA write.
        """
        if A is not None and self.lora_A is None:
            self._allocate()
        if self.lora_A is not None:
            self.lora_A[slot].zero_()
            self.lora_Bt[slot].zero_()
        if A is None:
            self.filled.discard(slot)
        else:
            self.filled.add(slot)
        if A is not None and scale is not None:
            if self.lora_scale is None:
                slots = self.lora_A.shape[0]
                # fp32 even over a half-precision base: c is close to 1, bf16 would round its
                # deviation from 1 (the whole DoRA effect) to steps of 1/128
                self.lora_scale = torch.ones(slots + 1, self.out_features, dtype=torch.float32,
                                             device=self.lora_A.device)
            self.lora_scale[slot].copy_(scale)
            self.dora_slots.add(slot)
        elif slot in self.dora_slots:
            self.lora_scale[slot].fill_(1.0)
            self.dora_slots.discard(slot)
        if A is None:
            return
        r = A.shape[0]
        self.lora_A[slot, :r].copy_(A)
        self.lora_Bt[slot, :r].copy_((B.float() * scaling).T)  # fp32 product, then the slot dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.context.plan
        if plan is not None and self.filled.isdisjoint(plan.slot_list):
            plan = None  # no adapter in this batch adapts this layer: its update is zero
        if plan is not None and self.dora_slots and not self.dora_slots.isdisjoint(plan.slot_list):
            return self._forward_dora(x, plan)
        out = self.base_layer(x, *args, **kwargs)
        if plan is None:
            return out
        return self._add_update(x, plan, out)

    def _forward_dora(self, x: torch.Tensor, plan: LoraBatch) -> torch.Tensor:
        """A batch with DoRA rows: ``(W x + update) ⊙ c[row] + b``, ``c`` = 1 for the other rows."""
        weight = self.base_layer.weight
        out = matmul(x, weight, self.fan_in_fan_out)  # the base product without its bias: it comes after c
        out = self._add_update(x, plan, out)
        if plan.scale_index is None:
            none = torch.full_like(plan.row_slots, self.lora_scale.shape[0] - 1)
            plan.scale_index = torch.where(plan.row_mask.view(-1) > 0, plan.row_slots, none)
        scale = self.lora_scale.index_select(0, plan.scale_index)[:, None]  # (B, 1, out), fp32
        shaped = out.view(plan.rows, -1, self.out_features)
        shaped = shaped.mul_(scale) if not torch.is_grad_enabled() else (shaped * scale).to(out.dtype)
        out = shaped.view(out.shape)
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return out
        return out.add_(bias.to(out.dtype)) if not torch.is_grad_enabled() else out + bias.to(out.dtype)

    def _add_update(self, x: torch.Tensor, plan: LoraBatch, out: torch.Tensor) -> torch.Tensor:
        """``out`` + the batch's low-rank update (into ``out`` itself in inference mode)."""
        xt = x.reshape(plan.rows, -1, x.shape[-1]).to(self.lora_A.dtype)  # (B, T, in)
        in_place = out.is_contiguous() and out.dtype == self.lora_A.dtype and not torch.is_grad_enabled()
        if plan.uniform:
            slot = plan.uniform_slot  # a Python int: views of the tables, no copy
            h = xt.reshape(-1, xt.shape[-1]) @ self.lora_A[slot, :plan.rank].T  # (B·T, r): the rank-r path stays small
            if in_place:  # the expand matmul accumulates into the base output: no extra pass
                out.view(-1, self.out_features).addmm_(h, self.lora_Bt[slot, :plan.rank])
                return out
            y = h @ self.lora_Bt[slot, :plan.rank]  # (B·T, out)
        elif plan.strategy == "gather":
            A = self.lora_A.index_select(0, plan.row_slots)[:, :plan.rank]  # (B, r, in): a copy per row
            Bt = self.lora_Bt.index_select(0, plan.row_slots)[:, :plan.rank]  # (B, r, out)
            y = torch.bmm(torch.bmm(xt, A.transpose(1, 2)), Bt) * plan.row_mask.to(xt.dtype)
        elif in_place:
            self._grouped(xt, plan, out.view(plan.rows, -1, self.out_features))  # into out's storage
            return out
        else:
            y = self._grouped(xt, plan)
        if in_place:
            return out.add_(y.reshape(out.shape))
        return out + y.reshape(out.shape).to(out.dtype)

    def _grouped(self, xt: torch.Tensor, plan: LoraBatch, out: torch.Tensor | None = None) -> torch.Tensor:
        """The LoRA update in row order; with ``out`` (B, T, out) it is added into ``out`` instead."""
        rows, tokens, _ = xt.shape
        u, g = len(plan.slots), plan.groups
        xg = xt.index_select(0, plan.gather)  # (U·G, T, in): one copy of the activations
        if plan.pads is not None:
            xg.index_fill_(0, plan.pads, 0.0)  # padding rows are zero, so their update is zero
        xg = xg.view(u, g * tokens, -1)  # (U, G·T, in)
        r = plan.rank
        if plan.first is not None:  # a range of slots: views of the tables, one bmm each
            A, Bt = self.lora_A[plan.first:plan.first + u, :r], self.lora_Bt[plan.first:plan.first + u, :r]
            h = torch.bmm(xg, A.transpose(1, 2))  # (U, G·T, r)
            y = torch.bmm(h, Bt)  # (U, G·T, out)
        else:  # scattered slots: one shrink and one expand per group, on views (a gather would copy)
            h = xg.new_empty(u, g * tokens, r)
            y = xg.new_empty(u, g * tokens, self.out_features)
            for i, slot in enumerate(plan.slot_list):
                torch.matmul(xg[i], self.lora_A[slot, :r].T, out=h[i])
                torch.matmul(h[i], self.lora_Bt[slot, :r], out=y[i])
        y = y.view(u * g, tokens, -1)  # (U·G, T, out)
        if out is not None:  # one pass: each group position adds into its row (padding adds zeros)
            return out.index_add_(0, plan.gather, y)
        y = torch.cat([y, y.new_zeros(1, tokens, y.shape[-1])])  # row U·G is the zero row
        return y.index_select(0, plan.scatter)  # (B, T, out), rows without an adapter get zeros

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
