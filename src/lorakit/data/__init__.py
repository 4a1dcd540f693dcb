"""lorakit.data: from a user's file to training batches.

Readers (JSONL, JSON, CSV, Parquet) -> formats (text, completion, alpaca, messages, sharegpt,
tokens; detected per row) -> chat template rendering with exact answer-only labels ->
truncation with counts -> train/eval split -> tokenisation cache -> padding-free packing or
length-grouped padded batches. The batch format is documented in :mod:`lorakit.data.collation`.

Names are imported lazily so ``import lorakit.data`` does not import torch.
"""

from __future__ import annotations

from lorakit._lazy import lazy_exports

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
