"""Which rows go into which batch: packed rows or length-grouped padded batches; and which of the two.

Both plans are pure functions of the row lengths, the seed and the epoch, so a resumed run
rebuilds the very same batches and skips the ones already done.

- Packed: a batch is ``batch_size`` packed rows of at most ``max_length`` tokens, each a list of
  whole examples. Examples go into rows by best-fit decreasing (longest first, each into the
  fullest row it still fits; ties in random order), which leaves under a few percent of each row
  empty on realistic length mixes; rows of similar fill make a batch (less tail padding), and the
  batches go in random order. An example is never split across rows. Attention then costs the
  square of each packed row's length (SDPA, eager) or of each example's (a variable-length kernel),
  never the square of the whole batch budget.
- Padded: rows are shuffled, cut into mega-batches of ``64 * batch_size`` rows, sorted by length
  inside each, and chunked into batches, so a batch holds rows of similar length (little
  padding) while batch order stays random.

Either way the largest batch comes first, so an out-of-memory error shows up at step 1 and not
an hour in.

:func:`choose_batching` decides between the two for ``data.packing: auto``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np

from lorakit.errors import LorakitError

MEGABATCH = 64
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn",
                    "kernels-community/flash-attn3", "kernels-community/vllm-flash-attn3")
"""Attention implementations that run packed examples through a variable-length kernel (from
``position_ids``, batch of one row), so their cost is Σ len² and nothing is computed across examples."""

PackedBatch = list[list[int]]
"""The rows of a packed batch, each the example indices it holds."""
Batch = Union[list[int], PackedBatch]


@dataclass(frozen=True)
class Batching:
    """How a run forms its batches (see :func:`choose_batching`)."""

    packed: bool
    flat: bool = False
    """Packed rows concatenated into one (1, T) row, for a variable-length attention kernel."""
    reason: str = ""

    def describe(self, batch_size: int, max_length: int, group_by_length: bool = True) -> str:
        """The one line a run prints about its batching."""
        if not self.packed:
            how = "padded, length-grouped" if group_by_length else "padded, in random order"
        elif self.flat:
            how = f"packed, {batch_size} rows of up to {max_length} tokens per batch, as one row for the varlen kernel"
        else:
            how = (f"packed, {batch_size} rows of up to {max_length} tokens per batch, each example with its own "
                   "positions and a block-causal mask")
        return f"batching: {how} ({self.reason})"


def choose_batching(setting: bool | str, attention: str | None, device: str) -> Batching:
    """Packed or padded batches for ``data.packing`` on this model and device.

    ``auto`` packs only where the attention kernel skips across packed examples (a variable-length
    flash-attention kernel, on CUDA): there packing removes padding and costs nothing extra. With
    SDPA or eager attention (the CPU, and GPUs without flash-attention) a packed row of L tokens
    costs attention over all L² pairs, masked or not, and no shared prefix can be run once, so
    length-grouped padded batches (a few percent padding) are the faster choice.

    Args:
        setting: ``data.packing``: ``"auto"``, True or False.
        attention: the model's attention implementation (``config._attn_implementation``).
        device: the device type (``cpu``, ``cuda``, …).

    Returns:
        The choice, with the reason a run prints.
    """
    varlen = attention in VARLEN_ATTENTION
    if setting is False:
        return Batching(False, reason="data.packing: false")
    if setting is True:
        if varlen:
            return Batching(True, True, f"data.packing: true; {attention} skips across examples")
        return Batching(True, False, f"data.packing: true; {attention or 'this'} attention computes every pair of "
                                     f"a packed row's tokens on {device}")
    if varlen and device == "cuda":
        return Batching(True, True, f"data.packing: auto; {attention} on {device} skips across examples")
    return Batching(False, reason=f"data.packing: auto; {attention or 'this'} attention on {device} would compute "
                                  "every pair of a packed row's tokens; rows of similar length padded cost less")


def plan_batches(lengths: Sequence[int] | np.ndarray, *, packing: bool, batch_size: int, max_length: int,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, group_by_length: bool = True) -> list[Batch]:
    """Group row indices into batches.

    Args:
        lengths: token count of each row (all ``<= max_length``).
        packing: batches of ``batch_size`` packed rows of up to ``max_length`` tokens each,
            instead of ``batch_size`` padded rows.
        batch_size: rows per batch (padded rows, or packed rows).
        max_length: the longest row allowed, and the length of a packed row.
        seed: base seed; each epoch draws its own order from ``(seed, epoch)``.
        epoch: epoch number.
        shuffle: ``False`` keeps file order (evaluation); packing then fills rows in order.
        group_by_length: padded batches of similar lengths (ignored with packing).

    Returns:
        A list of batches: each a list of row indices (padded), or a list of packed rows, each a
        list of row indices (packed).

    Raises:
        LorakitError: for a row longer than ``max_length``.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if batch_size < 1:
        raise LorakitError(f"batch_size must be >= 1, got {batch_size}")
    if len(lengths) and int(lengths.max()) > max_length:
        raise LorakitError(f"a row of {int(lengths.max())} tokens exceeds max_length {max_length}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    batches: list[Batch]
    if packing:
        bins = _best_fit(lengths, order, max_length) if shuffle else _next_fit(lengths, order, max_length)
        if shuffle:  # rows of similar fill together: the batch pads its rows to the fullest one
            fill = np.array([int(lengths[b].sum()) for b in bins])
            bins = [bins[i] for i in np.argsort(-fill, kind="stable")]
        batches = [bins[i:i + batch_size] for i in range(0, len(bins), batch_size)]
    elif group_by_length and shuffle:
        batches = _grouped(lengths, order, batch_size)
    else:
        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        _largest_first(batches, lengths)
    return batches


CPU_MICRO_BATCH_TOKENS = 1024
"""``train.micro_batch_tokens: auto`` on the CPU: larger micro-batches train no faster there (its matmuls
are already efficient at this size), they only hold more activations."""


def micro_batch_tokens(setting: int | str | None, device: str) -> int | None:
    """The micro-batch limit in tensor tokens for ``train.micro_batch_tokens`` on a device type (None: none)."""
    if setting == "auto":
        return CPU_MICRO_BATCH_TOKENS if device == "cpu" else None
    return setting  # type: ignore[return-value]


def split_batch(batch: Batch, lengths: Sequence[int] | np.ndarray, max_tokens: int | None) -> list[Batch]:
    """Cut a batch into micro-batches of at most ``max_tokens`` tensor tokens (rows × widest row).

    Rows are taken widest first (padded: the longest rows; packed: the fullest), each micro-batch as
    many as fit, at least one; so each micro-batch pads less than the batch did. None: no split.
    """
    if max_tokens is None:
        return [batch]
    lengths = np.asarray(lengths)
    widths = _widths(batch, lengths)
    out: list[Batch] = []
    widest = 0  # of the micro-batch being filled: its first row
    for i in sorted(range(len(batch)), key=lambda i: -widths[i]):
        if out and (len(out[-1]) + 1) * widest <= max_tokens:
            out[-1].append(batch[i])
        else:
            out.append([batch[i]])
            widest = widths[i]
    return out


def rows_of(batch: Batch) -> list[int]:
    """Every row index in a batch (padded or packed), in order."""
    return [i for item in batch for i in (item if isinstance(item, list) else [item])]


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


def _grouped(lengths: np.ndarray, order: np.ndarray, batch_size: int) -> list[Batch]:
    batches: list[Batch] = []
    size = MEGABATCH * batch_size
    for start in range(0, len(order), size):
        mega = order[start:start + size]
        mega = mega[np.argsort(-lengths[mega], kind="stable")]
        batches.extend(mega[i:i + batch_size].tolist() for i in range(0, len(mega), batch_size))
    return batches


def _widths(batch: Batch, lengths: np.ndarray) -> list[int]:
    """Tokens of each row of the batch: a padded row's length, a packed row's fill."""
    return [int(lengths[item].sum()) if isinstance(item, list) else int(lengths[item]) for item in batch]


def _shape(batch: Batch, lengths: np.ndarray) -> tuple[int, int]:
    """(rows, width) of the batch's tensors: padded rows pad to the longest row, packed rows to the fullest."""
    widths = _widths(batch, lengths)
    return len(widths), max(widths)


def _largest_first(batches: list[Batch], lengths: np.ndarray) -> None:
    if not batches:
        return
    cost = [rows * width for rows, width in (_shape(b, lengths) for b in batches)]  # tokens of the tensors
    top = int(np.argmax(cost))
    batches[0], batches[top] = batches[top], batches[0]


def padding_share(batches: list[Batch], lengths: Sequence[int] | np.ndarray) -> float:
    """Share of padding tokens the plan costs: a batch's rows (padded, or packed) are padded to its
    longest one."""
    lengths = np.asarray(lengths)
    real = sum(int(lengths[rows_of(b)].sum()) for b in batches)
    shaped = sum(rows * width for rows, width in (_shape(b, lengths) for b in batches))
    return 1.0 - real / shaped if shaped else 0.0
