"""From a data file to a :class:`TokenizedDataset` and a :class:`DataReport`, with a cache.

Rows stream from the reader through format detection (per row, so a file may mix formats),
validation, rendering and tokenisation. Nothing vanishes silently: a malformed row stops the
run with its location, or under ``on_bad_row: skip`` is counted and listed in the report; a row
over ``max_length`` is truncated (counted), skipped (counted) or stops the run; a truncated row
with no answer token left is dropped and counted, since it could teach nothing.

The cache is keyed by the file's SHA-256, the tokenizer (its full vocabulary and merges, special
tokens and template) and every setting that changes the tokens, and stored as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lorakit._fs import atomic_write
from lorakit.data.config import DataConfig
from lorakit.data.dataset import TokenizedDataset
from lorakit.data.formats import Sample, detect_format, to_sample
from lorakit.data.readers import BadRow, file_hash, file_kind, iter_rows
from lorakit.data.templates import IGNORE, NoChatTemplate, encode_chat, encode_text, resolve_template
from lorakit.errors import LorakitError
from lorakit._fs import cache_dir

CACHE_VERSION = 1
EXAMPLES_KEPT = 5  # locations listed per problem kind in a report
log = logging.getLogger("lorakit.data")


@dataclass
class DataReport:
    """What happened to the rows of one file."""

    source: str
    formats: dict[str, int] = field(default_factory=dict)
    """Rows per detected format, e.g. ``{"messages": 980, "alpaca": 20}``."""
    rows_read: int = 0
    rows_kept: int = 0
    bad_rows: int = 0
    """Malformed rows skipped under ``on_bad_row: skip``."""
    truncated: int = 0
    long_skipped: int = 0
    """Rows over ``max_length`` skipped under ``on_long_row: skip``."""
    no_answer: int = 0
    """Rows dropped because truncation cut away every trained token."""
    max_length: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    """Up to five messages per problem kind (``bad``, ``truncated``, ``long_skipped``, ``no_answer``)."""

    def note(self, kind: str, message: str) -> None:
        """Remember a problem location (the first few of each kind)."""
        kept = self.examples.setdefault(kind, [])
        if len(kept) < EXAMPLES_KEPT:
            kept.append(message)

    def format_name(self) -> str:
        """``messages``, or ``messages (980), alpaca (20)`` for a mixed file."""
        if len(self.formats) == 1:
            return next(iter(self.formats))
        return ", ".join(f"{name} ({count:,})" for name, count in sorted(self.formats.items(), key=lambda x: -x[1]))

    def summary(self) -> list[str]:
        """Human lines: counts, then every problem with its first locations."""
        lines = [f"{self.source}: {self.format_name()}; {self.rows_read:,} rows read, {self.rows_kept:,} kept"]
        problems = (("bad", self.bad_rows, "malformed rows skipped (on_bad_row: skip)"),
                    ("truncated", self.truncated, f"rows truncated to max_length={self.max_length}"),
                    ("long_skipped", self.long_skipped, f"rows over max_length={self.max_length} skipped"),
                    ("no_answer", self.no_answer, "rows dropped: no answer token left after truncation"))
        for kind, count, text in problems:
            if count:
                lines.append(f"  {count:,} {text}")
                lines.extend(f"    {where}" for where in self.examples.get(kind, []))
        return lines


def tokenize_file(path: str, tokenizer: Any, config: DataConfig, *, use_cache: bool | None = None,
                  cache_root: str | None = None) -> tuple[TokenizedDataset, DataReport]:
    """Read, validate and tokenise every row of ``path``.

    Args:
        path: the data file.
        tokenizer: a fast transformers tokenizer.
        config: formats, lengths, masking and bad-row policies.
        use_cache: override ``config.cache``.
        cache_root: cache folder (default ``lorakit._fs.cache_dir() / "data"``).

    Returns:
        The tokenised rows and the report of what was kept, truncated and skipped.

    Raises:
        LorakitError: for a bad file, or a bad row under ``on_bad_row: error``.
    """
    file_kind(path)  # a missing file or an unknown suffix is reported before hashing or tokenising
    template = resolve_template(tokenizer, config.chat_template)
    if not (config.cache if use_cache is None else use_cache):
        return _tokenize(path, tokenizer, template, config)
    cache_path = _cache_path(path, tokenizer, template, config, cache_root)
    cached = _load_cache(cache_path, path)
    if cached is not None:
        return cached
    dataset, report = _tokenize(path, tokenizer, template, config)
    try:
        _save_cache(cache_path, dataset, report)
    except (OSError, LorakitError) as err:  # the cache only saves time: say so, keep the result
        logging.getLogger("lorakit.cache").warning(
            "could not write the token cache %s (%s); continuing without it, the next run tokenises again",
            cache_path, getattr(err, "strerror", None) or err)
    return dataset, report


def encode_sample(sample: Sample, tokenizer: Any, template: str, config: DataConfig) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one canonical sample (no truncation)."""
    if sample.input_ids is not None:
        return list(sample.input_ids), list(sample.labels or sample.input_ids)
    if sample.text is not None:
        return encode_text(tokenizer, sample.text)
    return encode_chat(tokenizer, template, sample.messages, train_on_inputs=config.train_on_inputs,
                       last_turn_only=config.last_turn_only)


def iter_samples(path: str, config: DataConfig, report: DataReport):
    """Yield valid :class:`Sample` s, applying ``on_bad_row`` to the rest (counted in ``report``)."""
    for item in iter_rows(path):
        report.rows_read += 1
        try:
            if isinstance(item, BadRow):
                raise item
            fmt = detect_format(item) if config.format == "auto" else config.format
            sample = to_sample(item, fmt)
        except BadRow as bad:
            _bad_row(bad, config, report)
            continue
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        yield sample


def _bad_row(bad: BadRow, config: DataConfig, report: DataReport) -> None:
    if config.on_bad_row == "error":
        raise LorakitError(f"{bad}; the run stopped (data.on_bad_row: skip, or --skip-bad-rows, skips and counts such rows)")
    report.bad_rows += 1
    report.note("bad", str(bad))


def _tokenize(path: str, tokenizer: Any, template: str, config: DataConfig) -> tuple[TokenizedDataset, DataReport]:
    report = DataReport(source=path, max_length=config.max_length)
    rows: list[tuple[list[int], list[int], int]] = []
    for sample in iter_samples(path, config, report):
        try:
            ids, labels = encode_sample(sample, tokenizer, template, config)
        except NoChatTemplate as err:  # the file's fault, not this row's: stop at the first conversation
            raise LorakitError(f"{sample.where}: {err}") from None
        except LorakitError as err:  # the template failed on this conversation
            _bad_row(BadRow(sample.where, str(err), sample.line), config, report)
            continue
        if not ids:
            _bad_row(BadRow(sample.where, "the row tokenises to nothing", sample.line), config, report)
            continue
        if sample.input_ids is not None and max(ids) >= len(tokenizer):
            _bad_row(BadRow(sample.where, f"token id {max(ids):,} is outside the tokenizer's vocabulary "
                                          f"(ids 0 to {len(tokenizer) - 1:,})", sample.line), config, report)
            continue
        kept = _fit_length(sample, ids, labels, config, report)
        if kept is not None:
            rows.append((*kept, sample.line))
    report.rows_kept = len(rows)
    if not rows:
        raise LorakitError(f"{path}: no usable rows ({report.rows_read:,} read; " + "; ".join(report.summary()[1:]) + ")")
    if report.bad_rows or report.truncated or report.long_skipped or report.no_answer:
        for line in report.summary():
            log.warning("%s", line)
    return TokenizedDataset.from_rows(rows, source=path), report


def _fit_length(sample: Sample, ids: list[int], labels: list[int], config: DataConfig,
                report: DataReport) -> tuple[list[int], list[int]] | None:
    limit = config.max_length
    if len(ids) > limit:
        where = f"{sample.where}: {len(ids):,} tokens > max_length {limit:,}"
        if config.on_long_row == "error":
            raise LorakitError(f"{where}; the run stopped (raise data.max_length, or set data.on_long_row: "
                               "truncate or skip)")
        if config.on_long_row == "skip":
            report.long_skipped += 1
            report.note("long_skipped", where)
            return None
        ids, labels = ids[:limit], labels[:limit]
        report.truncated += 1
        report.note("truncated", where)
    if all(label == IGNORE for label in labels[1:]):
        report.no_answer += 1
        report.note("no_answer", f"{sample.where}: no trained token within the first {len(ids):,} tokens")
        return None
    return ids, labels


def tokenizer_fingerprint(tokenizer: Any, template: str) -> str:
    """A hash of everything in the tokenizer that changes token ids or the rendered text."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(template.encode())
    return digest.hexdigest()


def _cache_path(path: str, tokenizer: Any, template: str, config: DataConfig, cache_root: str | None) -> str:
    if cache_root is None:
        cache_root = os.path.join(str(cache_dir()), "data")
    settings = {k: getattr(config, k) for k in ("format", "max_length", "train_on_inputs", "last_turn_only",
                                                 "on_bad_row", "on_long_row")}
    # The path is part of the key because the report's messages name it.
    key = json.dumps({"version": CACHE_VERSION, "path": os.path.abspath(path), "file": file_hash(path), "size": os.path.getsize(path),
                      "tokenizer": tokenizer_fingerprint(tokenizer, template), "settings": settings}, sort_keys=True)
    name = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root, f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors")


def _load_cache(cache_path: str, source: str) -> tuple[TokenizedDataset, DataReport] | None:
    if not os.path.isfile(cache_path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(cache_path, framework="numpy") as handle:
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}
            meta = json.loads(handle.metadata()["report"])
    except Exception as err:  # a corrupt cache entry is rebuilt, never trusted
        log.warning("ignoring unreadable data cache %s (%s)", cache_path, err)
        return None
    report = DataReport(**{**meta, "source": source})
    return TokenizedDataset.from_arrays(arrays, source=source), report


def _save_cache(cache_path: str, dataset: TokenizedDataset, report: DataReport) -> None:
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    arrays, metadata = dataset.to_arrays(), {"report": json.dumps(asdict(report))}
    atomic_write(cache_path, lambda path: save_file(arrays, path, metadata=metadata))  # a reader never sees half a file


def token_stats(dataset: TokenizedDataset) -> dict[str, float]:
    """Length statistics and the share of trained tokens."""
    lengths = dataset.lengths
    trained = int(dataset.trained_tokens().sum())
    total = int(lengths.sum())
    return {"rows": len(dataset), "tokens": total, "trained_tokens": trained,
            "trained_share": trained / total if total else 0.0,
            "min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}

