"""``TokenizedDataset``: tokenised rows in flat arrays, plus the seeded train/eval split.

Rows are stored end to end in two int32 arrays (``input_ids``, ``labels``) with an ``offsets``
array marking where each row starts, so tens of thousands of rows cost a few megabytes, slice
without copies, and save to one safetensors file (no pickle) for the tokenisation cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lorakit.errors import LorakitError

IGNORE = -100


@dataclass
class TokenizedDataset:
    """Tokenised rows; row i is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: np.ndarray
    """(total_tokens,) int32."""
    labels: np.ndarray
    """(total_tokens,) int32, ``-100`` where no loss is taken; aligned with ``input_ids`` (not shifted)."""
    offsets: np.ndarray
    """(rows + 1,) int64, starting at 0."""
    lines: np.ndarray
    """(rows,) int64: the line (or row) number each row came from, for messages."""
    source: str = ""

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[list[int], list[int], int]], source: str = "") -> TokenizedDataset:
        """Build from ``(input_ids, labels, line)`` triples."""
        lengths = np.array([len(ids) for ids, _, _ in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = lambda k: np.fromiter((t for row in rows for t in row[k]), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
        lines = np.array([line for _, _, line in rows], dtype=np.int64)
        return cls(flat(0), flat(1), offsets, lines, source)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """(rows,) int64 token count of each row."""
        return np.diff(self.offsets)

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, labels)`` of row ``i`` as int32 views."""
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[start:end], self.labels[start:end]

    def trained_tokens(self) -> np.ndarray:
        """(rows,) number of tokens each row trains on (labels after the first, as the model shifts)."""
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64)
        trained = self.labels != IGNORE
        trained[self.offsets[:-1]] = False  # a row's first label is never predicted (rows are non-empty)
        return np.add.reduceat(trained.astype(np.int64), self.offsets[:-1])

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedDataset:
        """A new dataset of the rows at ``indices``, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = [(*self.row(int(i)), int(self.lines[i])) for i in indices]
        lengths = np.array([len(r[0]) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        cat = lambda k: np.concatenate([r[k] for r in rows]) if rows else np.zeros(0, np.int32)  # noqa: E731
        return TokenizedDataset(cat(0), cat(1), offsets, self.lines[indices], self.source)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save (see :meth:`from_arrays`)."""
        return {"input_ids": self.input_ids, "labels": self.labels, "offsets": self.offsets, "lines": self.lines}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], source: str = "") -> TokenizedDataset:
        """Rebuild from :meth:`to_arrays` output."""
        return cls(arrays["input_ids"], arrays["labels"], arrays["offsets"], arrays["lines"], source)


def split(dataset: TokenizedDataset, eval_split: float | int, seed: int) -> tuple[TokenizedDataset, TokenizedDataset]:
    """Hold out rows for evaluation, chosen by a seeded shuffle; both parts keep file order.

    Args:
        dataset: all rows.
        eval_split: a fraction in (0, 1) (rounded, at least one row) or a row count.
        seed: the same seed always holds out the same rows.

    Returns:
        ``(train, eval)``.

    Raises:
        LorakitError: when the split would leave no training rows.
    """
    n = len(dataset)
    n_eval = max(1, round(n * eval_split)) if isinstance(eval_split, float) else int(eval_split)
    if n_eval >= n:
        raise LorakitError(f"data.eval_split: holding out {n_eval} of {n} rows leaves nothing to train on")
    order = np.random.default_rng(seed).permutation(n)
    held = np.sort(order[:n_eval])
    kept = np.sort(order[n_eval:])
    return dataset.select(kept), dataset.select(held)
