"""``DataConfig``: the ``data:`` section of a training config, one field per YAML key.

The YAML shape of DESIGN.md §2 is the contract (``train``, ``eval``, ``eval_split``, ``format``,
``max_length``, ``packing``); the other fields have defaults that match what most users want:
loss on answers only, every assistant turn trained, bad rows stop the run with their location.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, fields
from typing import Any

from lorakit.errors import LorakitError

FORMATS = ("auto", "text", "completion", "alpaca", "messages", "sharegpt", "tokens")
PACKING = ("auto", True, False)
BAD_ROW_POLICIES = ("error", "skip")
LONG_ROW_POLICIES = ("truncate", "skip", "error")


@dataclass
class DataConfig:
    """Where the examples come from and how they become training batches."""

    train: str | None = None
    """Training file: ``.jsonl``, ``.json``, ``.csv`` or ``.parquet``."""
    eval: str | None = None
    """Optional held-out file; exclusive with ``eval_split``."""
    eval_split: float | int | None = None
    """Hold out part of ``train``: a fraction in (0, 1) or a number of rows (>= 1)."""
    format: str = "auto"
    """``auto`` detects it from the first row's fields; or one of ``FORMATS``."""
    max_length: int = 512
    """Longest row in tokens; longer rows follow ``on_long_row``."""
    packing: bool | str = "auto"
    """``auto`` packs where the attention kernel skips across packed documents (flash-attention's
    variable-length path) and pads length-grouped batches elsewhere (CPU, SDPA: attention over a
    packed row costs every pair of its tokens); ``true`` always packs ``batch_size`` rows of up to
    ``max_length`` tokens; ``false`` always pads. The run prints its choice."""
    train_on_inputs: bool = False
    """Also train on prompts, system and user turns (default: answers only)."""
    last_turn_only: bool = False
    """Train only on the final assistant turn of each conversation."""
    chat_template: str = "auto"
    """``auto`` (the tokenizer's own; conversations are refused when it has none), ``plain``, or a Jinja template."""
    on_bad_row: str = "error"
    """``error`` stops at the first malformed row with its location; ``skip`` counts and reports it."""
    on_long_row: str = "truncate"
    """Rows over ``max_length``: ``truncate`` (counted), ``skip`` (counted) or ``error``."""
    seed: int = 0
    """Seeds the train/eval split and the shuffling of batches."""
    group_by_length: bool = True
    """Without packing: batch rows of similar length together to cut padding."""
    cache: bool = True
    """Keep tokenised rows in a cache keyed by file hash, tokenizer and these settings."""

    def __post_init__(self) -> None:
        _choice("format", self.format, FORMATS)
        _choice("on_bad_row", self.on_bad_row, BAD_ROW_POLICIES)
        _choice("on_long_row", self.on_long_row, LONG_ROW_POLICIES)
        if self.packing not in PACKING or not isinstance(self.packing, (bool, str)):
            raise LorakitError(f"data.packing: expected auto, true or false, got {self.packing!r}")
        for name in ("train_on_inputs", "last_turn_only", "group_by_length", "cache"):
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"data.{name}: expected true or false, got {getattr(self, name)!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise LorakitError(f"data.max_length: expected an integer >= 2, got {self.max_length!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise LorakitError(f"data.seed: expected an integer, got {self.seed!r}")
        for name in ("train", "eval", "chat_template"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LorakitError(f"data.{name}: expected a string, got {value!r}")
        self._check_eval_split()

    def _check_eval_split(self) -> None:
        split = self.eval_split
        if split is None:
            return
        if self.eval is not None:
            raise LorakitError("data: give either 'eval' (a file) or 'eval_split' (a share of train), not both")
        if isinstance(split, bool) or not isinstance(split, (int, float)):
            raise LorakitError(f"data.eval_split: expected a fraction in (0, 1) or a row count, got {split!r}")
        if isinstance(split, float) and not 0.0 < split < 1.0:
            raise LorakitError(f"data.eval_split: a fraction must lie in (0, 1), got {split!r}")
        if isinstance(split, int) and split < 1:
            raise LorakitError(f"data.eval_split: a row count must be >= 1, got {split!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DataConfig:
        """Build from the YAML ``data:`` mapping; unknown keys are errors with a suggestion.

        Args:
            values: the mapping as read from YAML.

        Returns:
            The validated config.

        Raises:
            LorakitError: for an unknown key or an invalid value.
        """
        if not isinstance(values, dict):
            raise LorakitError(f"data: expected a mapping of settings, got {type(values).__name__}")
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
                raise LorakitError(f"data: unknown key '{key}'{hint}")
        return cls(**values)


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LorakitError(f"data.{name}: expected one of {', '.join(allowed)}, got {value!r}")
