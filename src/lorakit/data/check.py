"""``lorakit data check``'s report: format, counts, lengths, truncation, and one example with its mask.

The example shows exactly what the model sees: masked text as is, trained text between ``[[`` and
``]]`` (in colour on a terminal: dim prompt, bold green answer), so a wrong mask is obvious.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lorakit.data.dataset import IGNORE, TokenizedDataset
from lorakit.data.tokenize import DataReport, token_stats

OPEN, CLOSE = "[[", "]]"
DIM, GREEN, RESET = "\033[2m", "\033[1;32m", "\033[0m"


def histogram(lengths: np.ndarray, bins: int = 10, width: int = 40) -> list[str]:
    """Text histogram of row lengths: ``bins`` equal buckets from the shortest to the longest row."""
    lower, upper = int(lengths.min()), int(lengths.max()) + 1
    edges = np.unique(np.linspace(lower, upper, bins + 1).round().astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    pad = len(str(upper))
    lines = []
    for lo, hi, count in zip(edges[:-1], edges[1:], counts):
        bar = "#" * round(width * int(count) / top)
        lines.append(f"  {lo:>{pad}}-{hi - 1:<{pad}} {bar:<{width}} {int(count):,}")
    return lines


def render_example(tokenizer: Any, input_ids: np.ndarray, labels: np.ndarray, *, color: bool = False) -> str:
    """The row's text with trained spans marked: ``[[…]]`` or, with ``color``, bold green."""
    pieces = []
    trained = [int(label) != IGNORE for label in labels]
    start = 0
    for j in range(1, len(trained) + 1):  # group runs of equal state, decode each run whole
        if j == len(trained) or trained[j] != trained[start]:
            text = tokenizer.decode([int(t) for t in input_ids[start:j]], skip_special_tokens=False)
            if trained[start]:
                pieces.append(f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}")
            else:
                pieces.append(f"{DIM}{text}{RESET}" if color else text)
            start = j
    return "".join(pieces)


def token_table(tokenizer: Any, input_ids: np.ndarray, labels: np.ndarray) -> list[str]:
    """One line per token: position, id, text, and whether it is trained."""
    lines = ["  pos     id  trained  token"]
    for pos, (tok, label) in enumerate(zip(input_ids, labels)):
        mark = "yes" if int(label) != IGNORE else "-"
        lines.append(f"  {pos:>3} {int(tok):>6}  {mark:<7}  {tokenizer.decode([int(tok)])!r}")
    return lines


def check_report(dataset: TokenizedDataset, report: DataReport, tokenizer: Any, *, color: bool = False,
                 tokens: bool = False) -> str:
    """The full text of ``lorakit data check``.

    Args:
        dataset: the tokenised rows.
        report: what happened while reading them.
        tokenizer: to decode the example.
        color: ANSI colours instead of ``[[ ]]`` markers.
        tokens: add a per-token table of the first example.

    Returns:
        Printable text.
    """
    stats = token_stats(dataset)
    lines = [f"file        {report.source}",
             f"format      {report.format_name()}",
             f"rows        {report.rows_read:,} read, {report.rows_kept:,} kept",
             f"tokens      {stats['tokens']:,} in all, {stats['trained_tokens']:,} trained "
             f"({100 * stats['trained_share']:.1f}% answer tokens)",
             f"length      min {stats['min']:,}, median {stats['median']:,.0f}, mean {stats['mean']:,.1f}, "
             f"p95 {stats['p95']:,.0f}, max {stats['max']:,} (max_length {report.max_length:,})",
             f"truncated   {report.truncated:,} rows"]
    problems = report.summary()[1:]
    if problems:
        lines += ["problems"] + problems
    lines += ["", "token lengths"] + histogram(dataset.lengths)
    ids, labels = dataset.row(0)
    legend = "bold green = trained, dim = masked" if color else f"{OPEN}trained{CLOSE}, the rest masked"
    lines += ["", f"first example ({report.source} line {int(dataset.lines[0])}, {len(ids)} tokens; {legend}):",
              render_example(tokenizer, ids, labels, color=color)]
    if tokens:
        lines += [""] + token_table(tokenizer, ids, labels)
    return "\n".join(lines)
