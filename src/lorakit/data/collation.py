"""Turn planned rows into model-ready batches. This docstring is the contract with the training loop.

A batch is a ``dict[str, torch.Tensor]`` of model keyword arguments, all int64 unless noted:

``input_ids`` (B, T)
    Token ids.
``labels`` (B, T)
    The target of each position, ``-100`` where no loss is taken (prompts, padding, and the first
    token of every packed row). Labels are **aligned with** ``input_ids``, **not shifted**: the
    model shifts internally (HF convention — logits at t are scored against ``labels[t + 1]``).
    So ``model(**batch).loss`` is the mean over trained tokens. To sum losses over gradient
    accumulation steps correctly, count the targets with :func:`num_label_tokens`.
``position_ids`` (B, T)
    Always present. Restart at 0 at every packed row; ``0 … L-1`` in padded rows.
``attention_mask``
    Padded batches: (B, T), 1 for real tokens, 0 for right padding. Packed batches: **absent**
    (transformers 5 then finds row boundaries from the restarting ``position_ids`` and builds a
    block-causal mask for SDPA/eager; flash-attention uses them for varlen kernels). With the
    ``block_mask`` fallback: (1, 1, T, T) float additive (0 = may attend, dtype minimum =
    may not), causal within each row, for models that do not read packed ``position_ids``.

Packed batches have B = 1 and T = the sum of the packed rows' lengths (no padding unless
``pad_to_multiple_of`` asks for it; the pad tail is then its own row with ``-100`` labels).

Call the model as ``model(**batch, use_cache=False)``: transformers looks for packed rows only
when there is no cache, and a causal LM creates one by default; without ``use_cache=False`` rows
of a packed batch attend to each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lorakit.data.batching import plan_batches
from lorakit.data.dataset import IGNORE, TokenizedDataset

Rows = Sequence[tuple[np.ndarray, np.ndarray]]


def collate_packed(rows: Rows, *, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                   block_mask: bool = False, mask_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Concatenate rows into one padding-free row of shape (1, T).

    Args:
        rows: ``(input_ids, labels)`` pairs.
        pad_token_id: fills the optional tail.
        pad_to_multiple_of: round T up (fixed shapes for compiled models); the tail is a separate row.
        block_mask: add the (1, 1, T, T) block-diagonal causal mask instead of relying on
            ``position_ids`` detection.
        mask_dtype: dtype of that mask (the model's compute dtype).

    Returns:
        The batch (see the module docstring).
    """
    ids = [np.asarray(r[0], dtype=np.int64) for r in rows]
    labels = [np.asarray(r[1], dtype=np.int64).copy() for r in rows]
    for row_labels in labels:
        row_labels[0] = IGNORE  # its prediction would come from the previous row's last token
    lengths = [len(r) for r in ids]
    total = sum(lengths)
    if pad_to_multiple_of and total % pad_to_multiple_of:
        tail = pad_to_multiple_of - total % pad_to_multiple_of
        ids.append(np.full(tail, pad_token_id, dtype=np.int64))
        labels.append(np.full(tail, IGNORE, dtype=np.int64))
        lengths.append(tail)
    positions = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    batch = {"input_ids": torch.from_numpy(np.concatenate(ids))[None],  # (1, T)
             "labels": torch.from_numpy(np.concatenate(labels))[None],  # (1, T)
             "position_ids": torch.from_numpy(positions)[None]}  # (1, T)
    if block_mask:
        batch["attention_mask"] = block_diagonal_mask(lengths, dtype=mask_dtype)
    return batch


def block_diagonal_mask(lengths: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask that keeps each row to itself.

    Args:
        lengths: the packed rows' lengths, in order.
        dtype: floating dtype of the mask.

    Returns:
        (1, 1, T, T): 0 where query t may attend key s (same row, s <= t), the dtype's minimum elsewhere.
    """
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))  # (T,) row of each token
    same_row = segment[:, None] == segment[None, :]  # (T, T)
    causal = torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    mask = torch.zeros(len(segment), len(segment), dtype=dtype)
    mask.masked_fill_(~(same_row & causal), torch.finfo(dtype).min)
    return mask[None, None]


def collate_padded(rows: Rows, *, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: (B, T) tensors plus a (B, T) ``attention_mask``.

    Args:
        rows: ``(input_ids, labels)`` pairs.
        pad_token_id: id written into padding (never trained, never attended to).
        pad_to_multiple_of: round T up.

    Returns:
        The batch (see the module docstring).
    """
    width = max(len(r[0]) for r in rows)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)] = row_ids
        labels[i, : len(row_ids)] = row_labels
        attention[i, : len(row_ids)] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int64), (len(rows), width)).copy()
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(attention), "position_ids": torch.from_numpy(positions)}


def collate(dataset: TokenizedDataset, indices: Sequence[int], *, packing: bool, pad_token_id: int,
            pad_to_multiple_of: int | None = None, block_mask: bool = False) -> dict[str, torch.Tensor]:
    """The batch of ``dataset`` rows at ``indices`` (packed or padded)."""
    rows = [dataset.row(int(i)) for i in indices]
    if packing:
        return collate_packed(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                              block_mask=block_mask)
    return collate_padded(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)


def iter_batches(dataset: TokenizedDataset, *, packing: bool, batch_size: int, max_length: int, pad_token_id: int,
                 max_tokens: int | None = None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 group_by_length: bool = True, start: int = 0, pad_to_multiple_of: int | None = None,
                 block_mask: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch, planned by :func:`~lorakit.data.batching.plan_batches`.

    Args:
        dataset: tokenised rows.
        packing, batch_size, max_length, max_tokens, seed, epoch, shuffle, group_by_length: as
            :func:`~lorakit.data.batching.plan_batches`.
        pad_token_id: padding id (the tokenizer's pad token, else its EOS).
        start: skip this many batches (exact resume mid-epoch).
        pad_to_multiple_of, block_mask: as :func:`collate_packed`.

    Yields:
        Batches in the module docstring's format.
    """
    plan = plan_batches(dataset.lengths, packing=packing, batch_size=batch_size, max_length=max_length,
                        max_tokens=max_tokens, seed=seed, epoch=epoch, shuffle=shuffle,
                        group_by_length=group_by_length)
    for indices in plan[start:]:
        yield collate(dataset, indices, packing=packing, pad_token_id=pad_token_id,
                      pad_to_multiple_of=pad_to_multiple_of, block_mask=block_mask)


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions the loss is taken on (targets after the model's shift)."""
    return int((batch["labels"][..., 1:] != IGNORE).sum())
