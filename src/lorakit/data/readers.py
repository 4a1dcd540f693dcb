"""Read rows from JSONL, JSON, CSV and Parquet files, streaming where the format allows.

Every row carries its location (``data/train.jsonl line 17``, ``rows.parquet row 3``) so that
any later error can name it. JSONL, CSV and Parquet are read lazily, one line / record / record
batch at a time; a JSON file (an array, or an object holding one array) is parsed whole, as the
format demands. Blank JSONL lines are skipped, everything else malformed is reported.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Row:
    """One raw record and where it came from."""

    data: dict[str, Any]
    where: str
    """Human location for messages, e.g. ``data/train.jsonl line 17``."""
    line: int
    """Line number (JSONL, CSV) or 1-based row number (JSON, Parquet)."""


class BadRow(LorakitError):
    """A malformed row; under ``on_bad_row: skip`` it is counted and reported instead of raised."""

    def __init__(self, where: str, message: str, line: int = 0) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.line = line
        self.reason = message


def file_kind(path: str) -> str:
    """The reader for ``path`` from its suffix.

    Raises:
        LorakitError: for a missing file or an unknown suffix.
    """
    if os.path.isdir(path):
        raise LorakitError(f"{path}: is a folder; expected a data file (.jsonl, .json, .csv or .parquet)")
    if not os.path.isfile(path):
        raise LorakitError(f"{path}: no such data file; check the path (relative paths start in the "
                           f"current folder, {os.getcwd()})")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise LorakitError(f"{path}: unknown data file type '{suffix}' (expected {', '.join(SUFFIXES)})")
    return SUFFIXES[suffix]


def file_hash(path: str) -> str:
    """SHA-256 of the file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_rows(path: str) -> Iterator[Row | BadRow]:
    """Yield each record of ``path`` as a :class:`Row`, or a :class:`BadRow` for one that cannot be parsed.

    Bad rows are yielded, not raised, so the caller applies ``on_bad_row``. Problems with the
    whole file (missing, empty, not UTF-8, not a list) raise at once.

    Args:
        path: a ``.jsonl``/``.ndjson``, ``.json``, ``.csv`` or ``.parquet`` file.

    Yields:
        Rows in file order.

    Raises:
        LorakitError: when the file cannot be read as a whole.
    """
    kind = file_kind(path)
    if os.path.getsize(path) == 0:
        raise LorakitError(f"{path}: the file is empty (expected one example per row)")
    reader = {"jsonl": _jsonl, "json": _json, "csv": _csv, "parquet": _parquet}[kind]
    count = 0
    for row in reader(path):
        count += 1
        yield row
    if count == 0:
        raise LorakitError(f"{path}: no rows found (the file holds only blank lines or an empty list)")


def _jsonl(path: str) -> Iterator[Row | BadRow]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            where = f"{path} line {number}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise LorakitError(f"{where}: not valid UTF-8 (byte {err.start}); save the file as UTF-8") from None
            if not text.strip():
                continue
            try:
                data = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                yield BadRow(where, f"invalid JSON ({err.msg} at column {err.colno})", number)
                continue
            if not isinstance(data, dict):
                yield BadRow(where, f"expected a JSON object, got {type(data).__name__}", number)
                continue
            yield Row(data, where, number)


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        raw = handle.read()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise LorakitError(f"{path} line {line}: not valid UTF-8 (byte {err.start}); save the file as UTF-8") from None


def _json(path: str) -> Iterator[Row | BadRow]:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path} line {err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) != 1:
            raise LorakitError(f"{path}: expected a JSON list of examples, or an object holding one list "
                               f"(found keys: {', '.join(map(repr, data)) or 'none'})")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise LorakitError(f"{path}: expected a JSON list of examples, got {type(data).__name__}")
    for number, item in enumerate(data, start=1):
        where = f"{path} item {number}"
        if isinstance(item, dict):
            yield Row(item, where, number)
        else:
            yield BadRow(where, f"expected a JSON object, got {type(item).__name__}", number)


def _csv(path: str) -> Iterator[Row | BadRow]:
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            line = 1
            for record in reader:
                where = f"{path} line {line + 1}"  # the record starts after the previous one ended
                line = reader.line_num
                if None in record:
                    yield BadRow(where, f"more values than the {len(reader.fieldnames or [])} header columns", line)
                    continue
                yield Row({k: v for k, v in record.items() if v is not None}, where, line)
    except UnicodeDecodeError:
        _read_text(path)  # re-reads to find the line of the bad byte and raise with it
        raise


def _parquet(path: str) -> Iterator[Row | BadRow]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LorakitError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a corrupt file
        raise LorakitError(f"{path}: not a readable Parquet file ({err})") from None
    number = 0
    for batch in handle.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield Row(record, f"{path} row {number}", number)

