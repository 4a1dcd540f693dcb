"""Turn planned rows into model-ready batches. This docstring is the contract with the training loop.

A batch is a ``dict[str, torch.Tensor]`` of model keyword arguments, all int64 unless noted:

``input_ids`` (B, T)
    Token ids.
``labels`` (B, T)
    The target of each position, ``-100`` where no loss is taken (prompts, padding, and the first
    token of every packed example). Labels are **aligned with** ``input_ids``, **not shifted**: the
    model shifts internally (HF convention — logits at t are scored against ``labels[t + 1]``).
    So ``model(**batch).loss`` is the mean over trained tokens. To sum losses over gradient
    accumulation steps correctly, count the targets with :func:`num_label_tokens`.
``position_ids`` (B, T)
    Always present. ``0 … L-1`` in padded rows; in packed rows they restart at 0 at every example.
``attention_mask``
    Padded batches: (B, T), 1 for real tokens, 0 for right padding. Packed batches: **absent**
    (transformers 5 then finds the examples from the restarting ``position_ids`` and builds a
    block-causal mask for SDPA/eager; flash-attention uses them for its variable-length kernel).
    With the ``block_mask`` fallback: (B, 1, T, T) float additive (0 = may attend, dtype minimum =
    may not), causal within each example, for models that do not read packed ``position_ids``.

Packed batches have B = the number of packed rows and T = the fullest row's length: each row
holds whole examples end to end, and a shorter row's tail is padding that forms its own example
(``-100`` labels). Attention thus never spans more than one row of at most ``max_length`` tokens.
``flat=True`` concatenates the rows into one (1, ΣT) row without padding, the layout of
variable-length attention kernels (flash-attention reads only batches of one row as packed).

Call the model as ``model(**batch, use_cache=False)``: transformers looks for packed rows only
when there is no cache, and a causal LM creates one by default; without ``use_cache=False`` rows
of a packed batch attend to each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from lorakit.data.batching import Batch, plan_batches
from lorakit.data.dataset import IGNORE, TokenizedDataset

Rows = Sequence[tuple[np.ndarray, np.ndarray]]


def collate_packed(rows: Sequence[Rows], *, pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                   block_mask: bool = False, mask_dtype: torch.dtype = torch.float32,
                   flat: bool = False) -> dict[str, torch.Tensor]:
    """Packed rows, each holding whole examples end to end, as a (B, T) batch.

    Args:
        rows: the packed rows, each a sequence of ``(input_ids, labels)`` examples.
        pad_token_id: fills the tail of rows shorter than the fullest one.
        pad_to_multiple_of: round T up (fixed shapes for compiled models).
        block_mask: add the (B, 1, T, T) block-diagonal causal mask instead of relying on
            ``position_ids`` detection.
        mask_dtype: dtype of that mask (the model's compute dtype).
        flat: one (1, ΣT) row without padding (variable-length attention kernels).

    Returns:
        The batch (see the module docstring).
    """
    if flat:
        rows = [[example for row in rows for example in row]]
    packed = [_pack_row(row) for row in rows]  # (ids, labels, example lengths) per row
    width = max(len(ids) for ids, _, _ in packed)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = np.full((len(packed), width), pad_token_id, dtype=np.int64)
    labels = np.full((len(packed), width), IGNORE, dtype=np.int64)
    positions = np.zeros((len(packed), width), dtype=np.int64)
    segments = []
    for i, (row_ids, row_labels, lengths) in enumerate(packed):
        n = len(row_ids)
        ids[i, :n], labels[i, :n] = row_ids, row_labels
        if width > n:  # the tail: an example of its own, never trained
            lengths = [*lengths, width - n]
        positions[i] = np.concatenate([np.arange(k, dtype=np.int64) for k in lengths])
        segments.append(lengths)
    batch = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
             "position_ids": torch.from_numpy(positions)}
    if block_mask:
        batch["attention_mask"] = torch.cat([block_diagonal_mask(s, dtype=mask_dtype) for s in segments])
    return batch


def _pack_row(examples: Rows) -> tuple[np.ndarray, np.ndarray, list[int]]:
    ids = np.concatenate([np.asarray(e[0], dtype=np.int64) for e in examples])
    labels = np.concatenate([np.asarray(e[1], dtype=np.int64) for e in examples])
    lengths = [len(e[0]) for e in examples]
    labels[np.cumsum([0, *lengths[:-1]])] = IGNORE  # an example's first token is not predicted from the previous one
    return ids, labels, lengths


def block_diagonal_mask(lengths: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask that keeps each example of a packed row to itself.

    Args:
        lengths: the packed examples' lengths, in order.
        dtype: floating dtype of the mask.

    Returns:
        (1, 1, T, T): 0 where query t may attend key s (same example, s <= t), the dtype's minimum elsewhere.
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


def collate(dataset: TokenizedDataset, batch: Batch, *, packing: bool, pad_token_id: int,
            pad_to_multiple_of: int | None = None, block_mask: bool = False,
            flat: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one planned batch: row indices (padded), or packed rows of row indices (packed)."""
    if packing:
        rows = [[dataset.row(int(i)) for i in row] for row in batch]
        return collate_packed(rows, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                              block_mask=block_mask, flat=flat)
    return collate_padded([dataset.row(int(i)) for i in batch], pad_token_id=pad_token_id,
                          pad_to_multiple_of=pad_to_multiple_of)


def iter_batches(dataset: TokenizedDataset, *, packing: bool, batch_size: int, max_length: int, pad_token_id: int,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, group_by_length: bool = True, start: int = 0,
                 pad_to_multiple_of: int | None = None, block_mask: bool = False,
                 flat: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of one epoch, planned by :func:`~lorakit.data.batching.plan_batches`.

    Args:
        dataset: tokenised rows.
        packing, batch_size, max_length, seed, epoch, shuffle, group_by_length: as
            :func:`~lorakit.data.batching.plan_batches`.
        pad_token_id: padding id (the tokenizer's pad token, else its EOS).
        start: skip this many batches (exact resume mid-epoch).
        pad_to_multiple_of, block_mask, flat: as :func:`collate_packed`.

    Yields:
        Batches in the module docstring's format.
    """
    plan = plan_batches(dataset.lengths, packing=packing, batch_size=batch_size, max_length=max_length,
                        seed=seed, epoch=epoch, shuffle=shuffle, group_by_length=group_by_length)
    for indices in plan[start:]:
        yield collate(dataset, indices, packing=packing, pad_token_id=pad_token_id,
                      pad_to_multiple_of=pad_to_multiple_of, block_mask=block_mask, flat=flat)


def num_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Number of positions the loss is taken on (targets after the model's shift)."""
    return int((batch["labels"][..., 1:] != IGNORE).sum())
