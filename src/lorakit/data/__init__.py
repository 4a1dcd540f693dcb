"""lorakit.data: from a user's file to training batches.

Readers (JSONL, JSON, CSV, Parquet) -> formats (text, completion, alpaca, messages, sharegpt,
tokens; detected per row) -> chat template rendering with exact answer-only labels ->
truncation with counts -> train/eval split -> tokenisation cache -> padding-free packing or
length-grouped padded batches. The batch format is documented in :mod:`lorakit.data.collation`.

Names are imported lazily so ``import lorakit.data`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the lazy table below, for type checkers and editors (tests/test_lazy_exports.py)
    from lorakit.data.batching import padding_share as padding_share, plan_batches as plan_batches
    from lorakit.data.collation import (
        block_diagonal_mask as block_diagonal_mask, collate as collate, collate_packed as collate_packed,
        collate_padded as collate_padded, iter_batches as iter_batches, num_label_tokens as num_label_tokens,
    )
    from lorakit.data.config import DataConfig as DataConfig
    from lorakit.data.dataset import TokenizedDataset as TokenizedDataset, split as split
    from lorakit.data.pipeline import DataSplits as DataSplits, load_data as load_data, pad_token_id as pad_token_id
    from lorakit.data.templates import (
        IGNORE as IGNORE, PLAIN_TEMPLATE as PLAIN_TEMPLATE, encode_chat as encode_chat,
        resolve_template as resolve_template,
    )
    from lorakit.data.tokenize import (
        DataReport as DataReport, token_stats as token_stats, tokenize_file as tokenize_file,
    )

_LAZY = {
    "DataConfig": "lorakit.data.config",
    "TokenizedDataset": "lorakit.data.dataset",
    "split": "lorakit.data.dataset",
    "DataReport": "lorakit.data.tokenize",
    "tokenize_file": "lorakit.data.tokenize",
    "token_stats": "lorakit.data.tokenize",
    "DataSplits": "lorakit.data.pipeline",
    "load_data": "lorakit.data.pipeline",
    "pad_token_id": "lorakit.data.pipeline",
    "plan_batches": "lorakit.data.batching",
    "padding_share": "lorakit.data.batching",
    "collate": "lorakit.data.collation",
    "collate_packed": "lorakit.data.collation",
    "collate_padded": "lorakit.data.collation",
    "block_diagonal_mask": "lorakit.data.collation",
    "iter_batches": "lorakit.data.collation",
    "num_label_tokens": "lorakit.data.collation",
    "encode_chat": "lorakit.data.templates",
    "resolve_template": "lorakit.data.templates",
    "PLAIN_TEMPLATE": "lorakit.data.templates",
    "IGNORE": "lorakit.data.templates",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
