"""Truncation and long-row policies, the cache, the split, and the whole pipeline."""

from __future__ import annotations

import os

import pytest
from data.data_helpers import smol_tokenizer, write_jsonl

from lorakit.data import tokenize as tokenize_module
from lorakit.data.config import DataConfig
from lorakit.data.dataset import split
from lorakit.data.pipeline import load_data
from lorakit.data.tokenize import tokenize_file
from lorakit.errors import LorakitError

SHORT = {"prompt": "Hi", "completion": "Hello."}  # 35 tokens with SmolLM2's default system prompt
LONG = {"prompt": "Hi", "completion": "word " * 40}
LONG_PROMPT = {"prompt": "word " * 40, "completion": "ok"}


def rows_file(tmp_path, rows):
    return str(write_jsonl(tmp_path / "train.jsonl", rows))


def test_truncation_counts_and_never_drops_silently(tmp_path):
    path = rows_file(tmp_path, [SHORT, LONG, LONG_PROMPT, SHORT])
    dataset, report = tokenize_file(path, smol_tokenizer(), DataConfig(max_length=40, cache=False))
    assert dataset.lengths.tolist() == [35, 40, 35]
    assert (report.rows_read, report.rows_kept, report.truncated, report.no_answer) == (4, 3, 2, 1)
    assert dataset.lines.tolist() == [1, 2, 4]
    assert report.examples["truncated"][0] == f"{path} line 2: 74 tokens > max_length 40"
    assert report.examples["no_answer"] == [f"{path} line 3: no trained token within the first 40 tokens"]
    assert report.summary() == [
        f"{path}: completion; 4 rows read, 3 kept",
        "  2 rows truncated to max_length=40", f"    {path} line 2: 74 tokens > max_length 40",
        f"    {path} line 3: 74 tokens > max_length 40",
        "  1 rows dropped: no answer token left after truncation",
        f"    {path} line 3: no trained token within the first 40 tokens"]


def test_long_row_skip_and_error(tmp_path):
    path = rows_file(tmp_path, [SHORT, LONG])
    dataset, report = tokenize_file(path, smol_tokenizer(), DataConfig(max_length=40, on_long_row="skip", cache=False))
    assert (len(dataset), report.long_skipped, report.truncated) == (1, 1, 0)
    with pytest.raises(LorakitError, match=r"train.jsonl line 2: 74 tokens > max_length 40; the run stopped"):
        tokenize_file(path, smol_tokenizer(), DataConfig(max_length=40, on_long_row="error", cache=False))


def test_cache_is_reused_and_keyed_by_file_and_settings(tmp_path, monkeypatch):
    path = rows_file(tmp_path, [SHORT, LONG])
    cache = str(tmp_path / "cache")
    config = DataConfig(max_length=40)
    first, report = tokenize_file(path, smol_tokenizer(), config, cache_root=cache)
    assert len(os.listdir(cache)) == 1
    calls = []
    original = tokenize_module._tokenize
    monkeypatch.setattr(tokenize_module, "_tokenize", lambda *a: calls.append(1) or original(*a))
    again, report2 = tokenize_file(path, smol_tokenizer(), config, cache_root=cache)
    assert calls == [] and report2 == report
    assert again.input_ids.tolist() == first.input_ids.tolist() and again.labels.tolist() == first.labels.tolist()
    tokenize_file(path, smol_tokenizer(), DataConfig(max_length=41), cache_root=cache)
    tokenize_file(path, smol_tokenizer(), DataConfig(max_length=40, train_on_inputs=True), cache_root=cache)
    write_jsonl(tmp_path / "train.jsonl", [SHORT, LONG, SHORT])
    tokenize_file(path, smol_tokenizer(), config, cache_root=cache)
    assert len(calls) == 3 and len(os.listdir(cache)) == 4


def test_split_is_seeded_and_disjoint(tmp_path):
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    dataset, _ = tokenize_file(rows_file(tmp_path, rows), smol_tokenizer(), DataConfig(cache=False))
    train, held = split(dataset, 0.25, seed=3)
    assert (len(train), len(held)) == (15, 5)
    assert sorted(train.lines.tolist() + held.lines.tolist()) == list(range(1, 21))
    assert held.lines.tolist() == split(dataset, 0.25, seed=3)[1].lines.tolist()
    assert held.lines.tolist() != split(dataset, 0.25, seed=4)[1].lines.tolist()
    assert held.row(0)[0].tolist() == dataset.row(int(held.lines[0]) - 1)[0].tolist()
    with pytest.raises(LorakitError, match="holding out 20 of 20 rows leaves nothing to train on"):
        split(dataset, 20, seed=0)


def test_load_data_with_eval_file_and_split(tmp_path):
    train = rows_file(tmp_path, [SHORT] * 10)
    held = str(write_jsonl(tmp_path / "eval.jsonl", [SHORT] * 3))
    splits = load_data(DataConfig(train=train, eval=held, cache=False), smol_tokenizer())
    assert (len(splits.train), len(splits.eval), len(splits.reports)) == (10, 3, 2)
    splits = load_data(DataConfig(train=train, eval_split=2, cache=False), smol_tokenizer())
    assert (len(splits.train), len(splits.eval)) == (8, 2)
    assert load_data(DataConfig(train=train, cache=False), smol_tokenizer()).eval is None


def test_no_usable_rows(tmp_path):
    path = rows_file(tmp_path, [{"foo": 1}])
    with pytest.raises(LorakitError, match=r"no usable rows \(1 read;   1 malformed rows skipped"):
        tokenize_file(path, smol_tokenizer(), DataConfig(on_bad_row="skip", cache=False))
