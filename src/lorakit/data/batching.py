"""Which rows go into which batch: padding-free packing or length-grouped padded batches.

Both plans are pure functions of the row lengths, the seed and the epoch, so a resumed run
rebuilds the very same batches and skips the ones already done.

- Packing: rows are placed into bins of ``max_tokens`` tokens by best-fit decreasing (longest
  rows first, each into the fullest bin it still fits; ties in random order), which leaves
  under a few percent of each bin empty on realistic length mixes. The bins then go in random
  order. A row is never split across bins.
- Padded: rows are shuffled, cut into mega-batches of ``64 * batch_size`` rows, sorted by length
  inside each, and chunked into batches, so a batch holds rows of similar length (little
  padding) while batch order stays random.

Either way the largest batch comes first, so an out-of-memory error shows up at step 1 and not
an hour in.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

from lorakit.errors import LorakitError

MEGABATCH = 64


def plan_batches(lengths: Sequence[int] | np.ndarray, *, packing: bool, batch_size: int, max_length: int,
                 max_tokens: int | None = None, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                 group_by_length: bool = True) -> list[list[int]]:
    """Group row indices into batches.

    Args:
        lengths: token count of each row (all ``<= max_length``).
        packing: pack rows into ``max_tokens``-token batches instead of padding ``batch_size`` rows.
        batch_size: rows per padded batch; with packing, sets the default budget
            ``max_tokens = batch_size * max_length`` (the tokens of ``batch_size`` full rows).
        max_length: the longest row allowed.
        max_tokens: token budget of a packed batch (``>= max_length``).
        seed: base seed; each epoch draws its own order from ``(seed, epoch)``.
        epoch: epoch number.
        shuffle: ``False`` keeps file order (evaluation); packing then fills bins in order.
        group_by_length: padded batches of similar lengths (ignored with packing).

    Returns:
        A list of batches, each a list of row indices.

    Raises:
        LorakitError: for a budget below ``max_length`` or a row longer than it.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1, got {batch_size}")
    if len(lengths) and int(lengths.max()) > max_length:
        raise LorakitError(f"a row of {int(lengths.max())} tokens exceeds max_length {max_length}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if packing:
        budget = max_tokens if max_tokens is not None else batch_size * max_length
        if budget < max_length:
            raise LorakitError(f"max_tokens {budget} is smaller than max_length {max_length}: a row would not fit")
        batches = _best_fit(lengths, order, budget) if shuffle else _next_fit(lengths, order, budget)
    elif group_by_length and shuffle:
        batches = _grouped(lengths, order, batch_size)
    else:
        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        _largest_first(batches, lengths, packing)
    return batches


def _best_fit(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[list[int]]:
    # Stable sort of the shuffled order: longest first, equal lengths in random order.
    by_length = order[np.argsort(-lengths[order], kind="stable")]
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, bin id)
    for row in by_length.tolist():
        need = int(lengths[row])
        at = bisect.bisect_left(free, (need, -1))  # the fullest bin with room
        if at < len(free):
            space, b = free.pop(at)
        else:
            space, b = budget, len(bins)
            bins.append([])
        bins[b].append(row)
        if space - need > 0:
            bisect.insort(free, (space - need, b))
    return bins


def _next_fit(lengths: np.ndarray, order: np.ndarray, budget: int) -> list[list[int]]:
    bins: list[list[int]] = [[]]
    used = 0
    for row in order.tolist():
        if used + int(lengths[row]) > budget:
            bins.append([])
            used = 0
        bins[-1].append(row)
        used += int(lengths[row])
    return [b for b in bins if b]


def _grouped(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> list[list[int]]:
    batches = []
    size = MEGABATCH * batch_size
    for start in range(0, len(order), size):
        mega = order[start:start + size]
        mega = mega[np.argsort(-lengths[mega], kind="stable")]
        batches.extend(mega[i:i + batch_size].tolist() for i in range(0, len(mega), batch_size))
    return batches


def _largest_first(batches: list[list[int]], lengths: np.ndarray, packing: bool) -> None:
    if not batches:
        return
    # Memory grows with the tokens of a packed batch, and with rows x longest row when padded.
    cost = [int(lengths[b].sum()) if packing else len(b) * int(lengths[b].max()) for b in batches]
    top = int(np.argmax(cost))
    batches[0], batches[top] = batches[top], batches[0]


def padding_share(batches: list[list[int]], lengths: Sequence[int] | np.ndarray, *, packing: bool,
                  max_tokens: int | None = None) -> float:
    """Share of padding tokens the plan costs: padded batches pad to their longest row; packed batches
    pad nothing, unless ``max_tokens`` asks for fixed-size batches."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[b].sum()) for b in batches)
    if packing:
        shaped = real if max_tokens is None else max_tokens * len(batches)
    else:
        shaped = sum(len(b) * int(lengths[b].max()) for b in batches)
    return 1.0 - real / shaped if shaped else 0.0
