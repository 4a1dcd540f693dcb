"""Every format gives the same tokens and labels; bad rows name file, line and field."""

from __future__ import annotations

import pytest
from data.data_helpers import smol_tokenizer, write_jsonl

from lorakit.data.config import DataConfig
from lorakit.data.tokenize import tokenize_file
from lorakit.errors import LorakitError

SYSTEM, USER, ANSWER = "You answer in one word.", "Capital of France?", "Paris."
SAME_CONVERSATION = {
    "messages": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER},
                              {"role": "assistant", "content": ANSWER}]},
    "sharegpt": {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": USER},
                                   {"from": "gpt", "value": ANSWER}]},
    "alpaca": {"system": SYSTEM, "instruction": USER, "input": "", "output": ANSWER},
    "completion": {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
                   "completion": [{"role": "assistant", "content": ANSWER}]},
}


def load(tmp_path, rows, name="train.jsonl", **options):
    config = DataConfig(cache=False, **options)
    return tokenize_file(str(write_jsonl(tmp_path / name, rows)), smol_tokenizer(), config)


def test_every_format_gives_identical_tokens_and_labels(tmp_path):
    results = {}
    for fmt, row in SAME_CONVERSATION.items():
        dataset, report = load(tmp_path, [row], name=f"{fmt}.jsonl")
        assert report.formats == {fmt: 1}
        results[fmt] = dataset.row(0)
    ids, labels = results["messages"]
    assert smol_tokenizer().decode(ids[labels != -100]) == "Paris.<|im_end|>"
    for fmt, (other_ids, other_labels) in results.items():
        assert other_ids.tolist() == ids.tolist(), fmt
        assert other_labels.tolist() == labels.tolist(), fmt
    # Pre-tokenised rows pass through unchanged.
    dataset, report = load(tmp_path, [{"input_ids": ids.tolist(), "labels": labels.tolist()}], name="tokens.jsonl")
    assert report.formats == {"tokens": 1}
    assert dataset.row(0)[0].tolist() == ids.tolist() and dataset.row(0)[1].tolist() == labels.tolist()


def test_plain_prompt_completion_and_alpaca_input_become_user_turns(tmp_path):
    alpaca, _ = load(tmp_path, [{"instruction": "Translate.", "input": "chat", "output": "cat"}], name="a.jsonl")
    messages, _ = load(tmp_path, [{"messages": [{"role": "user", "content": "Translate.\n\nchat"},
                                                {"role": "assistant", "content": "cat"}]}], name="m.jsonl")
    completion, _ = load(tmp_path, [{"prompt": "Translate.\n\nchat", "completion": "cat"}], name="c.jsonl")
    assert alpaca.row(0)[0].tolist() == messages.row(0)[0].tolist() == completion.row(0)[0].tolist()
    assert alpaca.row(0)[1].tolist() == messages.row(0)[1].tolist() == completion.row(0)[1].tolist()


def test_mixed_formats_are_detected_per_row(tmp_path):
    rows = [SAME_CONVERSATION["alpaca"], {"text": "hello world"}, SAME_CONVERSATION["messages"]]
    dataset, report = load(tmp_path, rows)
    assert report.formats == {"alpaca": 1, "text": 1, "messages": 1}
    assert dataset.row(1)[0].tolist() == [28120, 905, 2] == dataset.row(1)[1].tolist()
    assert dataset.lines.tolist() == [1, 2, 3]


BAD_ROWS = [
    ({"foo": 1, "bar": 2}, "line 2: no 'messages', 'text', 'prompt'/'completion', 'instruction'/'output', "
                           "'conversations' or 'input_ids' field (found: 'foo', 'bar')"),
    ({"instruction": "Do it", "output": ""}, "line 2: field 'output' is empty"),
    ({"prompt": "Hi", "completion": 7}, "line 2: field 'completion' must be a string, got int"),
    ({"messages": [{"role": "user", "content": "Hi"}]},
     "line 2: field 'messages': the conversation has no final assistant answer"),
    ({"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     "line 2: field 'messages'[0].role: unknown role 'human' (expected one of system, user, assistant)"),
    ({"conversations": [{"from": "robot", "value": "Hi"}]},
     "line 2: field 'conversations'[0].from: unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                   {"role": "assistant", "content": "c"}]},
     "line 2: field 'messages'[1]: expected a 'assistant' turn, got 'user'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]},
     "line 2: field 'messages'[1]: the assistant answer is empty"),
    ({"messages": "not a list"}, "line 2: field 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
     "line 2: field 'messages'[0].content must be a string, got int"),
    ({"input_ids": [1, 2, "x"]}, "line 2: field 'input_ids'[2]: expected a token id"),
    ({"input_ids": [1, 2], "labels": [1]}, "line 2: field 'labels' has 1 values but 'input_ids' has 2"),
]


@pytest.mark.parametrize("row, message", BAD_ROWS, ids=[str(i) for i in range(len(BAD_ROWS))])
def test_bad_row_stops_the_run_with_its_location(tmp_path, row, message):
    with pytest.raises(LorakitError) as err:
        load(tmp_path, [SAME_CONVERSATION["messages"], row])
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'train.jsonl'} line 2: ")
    assert message in text
    assert text.endswith("the run stopped (data.on_bad_row: skip, or --skip-bad-rows, skips and counts such rows)")


def test_skip_counts_and_lists_bad_rows(tmp_path):
    rows = [SAME_CONVERSATION["messages"], {"foo": 1}, "{not json", SAME_CONVERSATION["alpaca"], [1, 2]]
    dataset, report = load(tmp_path, rows, on_bad_row="skip")
    assert (report.rows_read, report.rows_kept, report.bad_rows, len(dataset)) == (5, 2, 3, 2)
    assert dataset.lines.tolist() == [1, 4]
    path = tmp_path / "train.jsonl"
    assert report.examples["bad"][0].startswith(f"{path} line 2: no 'messages'")
    assert report.examples["bad"][1].startswith(f"{path} line 3: invalid JSON (Expecting property name")
    assert report.examples["bad"][2] == f"{path} line 5: expected a JSON object, got list"
    assert "  3 malformed rows skipped (on_bad_row: skip)" in report.summary()


def test_explicit_format_names_the_missing_field(tmp_path):
    with pytest.raises(LorakitError, match=r"line 1: missing field 'completion' \(format 'completion'; "
                                           r"found: 'prompt', 'answer'\)"):
        load(tmp_path, [{"prompt": "Hi", "answer": "x"}], format="completion")
