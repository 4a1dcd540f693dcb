"""The quickstart on the real SmolLM2 (a few steps), and its task metric."""

from __future__ import annotations

import json
import re

import pytest
from train.train_helpers import write_data

from lorakit.commands.train import run_quickstart
from lorakit.train.quickstart import EVAL_FILE, QUICKSTART, TRAIN_FILE, is_good_answer


def test_bundled_data_is_well_formed():
    for path, rows in ((TRAIN_FILE, 230), (EVAL_FILE, 40)):
        lines = path.read_text().splitlines()
        assert len(lines) == rows
        for line in lines:
            answer = json.loads(json.loads(line)["messages"][-1]["content"])
            assert set(answer) == {"word", "pos", "definition"}
    train_words = {json.loads(json.loads(x)["messages"][-1]["content"])["word"] for x in TRAIN_FILE.read_text().splitlines()}
    eval_words = {json.loads(json.loads(x)["messages"][-1]["content"])["word"] for x in EVAL_FILE.read_text().splitlines()}
    assert not train_words & eval_words  # held-out words are really held out


@pytest.mark.parametrize(("text", "good"), [
    ('{"word": "harbor", "pos": "noun", "definition": "a port"}', True),
    (' {"word": "Harbor", "pos": "noun", "definition": "a port"}\n', True),
    ('{"word": "port", "pos": "noun", "definition": "a port"}', False),
    ('{"word": "harbor", "definition": "a port"}', False),
    ('A harbor is a sheltered port.', False),
    ('{"word": "harbor", "pos": "noun", "definition": "a port"} and more', False),
])
def test_task_metric(text, good):
    assert is_good_answer(text, "harbor") is good


@pytest.mark.slow
def test_quickstart_trains_smollm2_and_eval_loss_goes_down(tmp_path, smollm2_path, capsys):
    # A short version of the quickstart (same code path): 3 steps of 2 rows, 4 held-out prompts.
    train = write_data(tmp_path, rows=6)
    held = tmp_path / "eval.jsonl"
    held.write_text("\n".join(EVAL_FILE.read_text().splitlines()[:4]) + "\n")
    status = run_quickstart([f"data.train={train}", f"data.eval={held}", "train.max_steps=3", "train.batch_size=2",
                             "train.lr=3e-3", "train.warmup_steps=0", "train.eval_every=null",
                             f"output={tmp_path / 'run'}", "data.cache=false"], quiet=True)
    assert status == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"eval loss \(answers\)\s+([\d.]+)\s+([\d.]+)", out).groups())
    assert after < before - 0.3, out
    assert "Q: " in out and "adapter:" in out
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert QUICKSTART["model"] == "smollm2-135m-instruct"
