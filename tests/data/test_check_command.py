"""``lorakit data check FILE --model M`` end to end on the real SmolLM2 tokenizer."""

from __future__ import annotations

from data.data_helpers import write_jsonl

from lorakit.cli import main


def test_check_reports_format_counts_lengths_and_marked_example(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
        {"prompt": "Say hi", "completion": "word " * 40}])
    assert main(["data", "check", str(path), "--model", "smollm2-135m-instruct", "--max-length", "40",
                 "--color", "never", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert f"file        {path}\n" in out
    assert "format      messages (1), completion (1)\n" in out
    assert "rows        2 read, 2 kept\n" in out
    assert "tokens      77 in all, 10 trained (13.0% answer tokens)\n" in out
    assert "truncated   1 rows\n" in out
    assert f"    {path} line 2: 75 tokens > max_length 40" in out
    assert out.rstrip().endswith("<|im_start|>assistant\n[[4<|im_end|>]]")


def test_check_bad_row_exits_2_with_location(tmp_path, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", ['{"text": "ok"}', '{"text": 5}'])
    assert main(["data", "check", str(path), "--model", "smollm2-135m-instruct", "--no-cache"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} line 2: field 'text' must be a string, got int; the run stopped")
