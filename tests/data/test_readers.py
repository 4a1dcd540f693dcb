"""Readers: JSONL, JSON, CSV, Parquet; whole-file problems stop with the file (and line) named."""

from __future__ import annotations

import json

import pytest

from lorakit.data.readers import BadRow, Row, iter_rows
from lorakit.errors import LorakitError

ROWS = [{"prompt": "a", "completion": "b"}, {"prompt": "c, \"quoted\"\nline", "completion": "d"}]


def read(path):
    return [(r.data, r.line) if isinstance(r, Row) else ("BAD", str(r)) for r in iter_rows(str(path))]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert read(path) == [(ROWS[0], 1), (ROWS[1], 3)]


def test_invalid_json_line_is_a_bad_row_with_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + '{"prompt": "x",\n', encoding="utf-8")
    rows = list(iter_rows(str(path)))
    assert isinstance(rows[1], BadRow) and rows[1].line == 2
    assert str(rows[1]) == f"{path} line 2: invalid JSON (Expecting property name enclosed in double quotes at column 16)"


def test_json_list_and_object_holding_a_list(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps({"version": 1, "data": ROWS}), encoding="utf-8")
    assert read(tmp_path / "a.json") == read(tmp_path / "b.json") == [(ROWS[0], 1), (ROWS[1], 2)]


def test_csv_with_quoted_multiline_cell(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('prompt,completion\na,b\n"c, ""quoted""\nline",d\ne,f\n', encoding="utf-8")
    rows = read(path)
    assert [r[0] for r in rows] == ROWS + [{"prompt": "e", "completion": "f"}]
    assert [r[1] for r in rows] == [2, 4, 5]  # the line each record ends on


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    assert read(tmp_path / "a.parquet") == [(ROWS[0], 1), (ROWS[1], 2)]


@pytest.mark.parametrize("name, content, message", [
    ("empty.jsonl", b"", "the file is empty"),
    ("blank.jsonl", b"\n  \n", "no rows found"),
    ("latin1.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not valid UTF-8 (byte 13)"),
    ("latin1.json", b'[\n{"text": "caf\xe9"}]', "line 2: not valid UTF-8"),
    ("latin1.csv", b'text\nok\ncaf\xe9\n', "line 3: not valid UTF-8"),
    ("bad.json", b'[{"text": 1},\n{', "line 2: invalid JSON"),
    ("scalar.json", b'3', "expected a JSON list of examples, got int"),
    ("rows.txt", b'hello', "unknown data file type '.txt'"),
])
def test_whole_file_problems(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(LorakitError) as err:
        read(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(LorakitError, match="no such data file"):
        read(tmp_path / "nope.jsonl")
