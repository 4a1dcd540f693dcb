"""The one call the training loop makes: config + tokenizer -> train and eval rows with reports."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.data.config import DataConfig
from lorakit.data.dataset import TokenizedDataset, split
from lorakit.data.tokenize import DataReport, tokenize_file
from lorakit.errors import LorakitError


@dataclass
class DataSplits:
    """Tokenised training rows, optional evaluation rows, and what happened to each file."""

    train: TokenizedDataset
    eval: TokenizedDataset | None
    reports: list[DataReport]


def load_data(config: DataConfig, tokenizer: Any, *, cache_root: str | None = None) -> DataSplits:
    """Tokenise ``config.train`` (and ``config.eval``), then hold out ``eval_split`` rows if asked.

    Args:
        config: the ``data:`` section.
        tokenizer: a fast transformers tokenizer (``lorakit.models.load_tokenizer``).
        cache_root: tokenisation cache folder (default under ``lorakit._fs.cache_dir()``).

    Returns:
        The splits; ``eval`` is None without ``eval`` or ``eval_split``.

    Raises:
        LorakitError: for a missing ``train`` file or any bad data (see ``tokenize_file``).
    """
    if not config.train:
        raise LorakitError("data.train: no training file given")
    train, report = tokenize_file(config.train, tokenizer, config, cache_root=cache_root)
    reports = [report]
    held = None
    if config.eval:
        held, eval_report = tokenize_file(config.eval, tokenizer, config, cache_root=cache_root)
        reports.append(eval_report)
    elif config.eval_split is not None:
        train, held = split(train, config.eval_split, config.seed)
    return DataSplits(train, held, reports)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the tokenizer's pad token, else EOS, else 0 (never trained or attended)."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0
