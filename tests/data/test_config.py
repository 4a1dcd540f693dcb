"""DataConfig: the YAML ``data:`` section, validated with messages that say what was expected."""

from __future__ import annotations

import pytest

from lorakit.data.config import DataConfig
from lorakit.errors import LorakitError


def test_design_yaml_shape():
    config = DataConfig.from_dict({"train": "data/train.jsonl", "eval": "data/eval.jsonl", "format": "auto",
                                   "max_length": 512, "packing": True})
    assert (config.train, config.eval, config.max_length, config.packing) == ("data/train.jsonl", "data/eval.jsonl",
                                                                             512, True)
    assert (config.train_on_inputs, config.on_bad_row, config.on_long_row) == (False, "error", "truncate")


@pytest.mark.parametrize("values, message", [
    ({"max_lenght": 5}, "data: unknown key 'max_lenght' (did you mean 'max_length'?)"),
    ({"format": "chatml"}, "data.format: expected one of auto, text, completion, alpaca, messages, sharegpt, tokens"),
    ({"max_length": 1}, "data.max_length: expected an integer >= 2, got 1"),
    ({"max_length": "512"}, "data.max_length: expected an integer >= 2, got '512'"),
    ({"packing": "yes"}, "data.packing: expected auto, true or false, got 'yes'"),
    ({"packing": 1}, "data.packing: expected auto, true or false, got 1"),
    ({"eval_split": 1.5}, "data.eval_split: a fraction must lie in (0, 1), got 1.5"),
    ({"eval_split": 0}, "data.eval_split: a row count must be >= 1, got 0"),
    ({"eval": "e.jsonl", "eval_split": 0.1}, "data: give either 'eval' (a file) or 'eval_split'"),
    ({"on_bad_row": "ignore"}, "data.on_bad_row: expected one of error, skip, got 'ignore'"),
])
def test_invalid_values(values, message):
    with pytest.raises(LorakitError) as err:
        DataConfig.from_dict(values)
    assert str(err.value).startswith(message)
