"""``lorakit eval --tasks``: lm-evaluation-harness tasks (local YAMLs under tests/lm_eval_tasks) on the base
and each adapter in process; the scores printed and in the report are lm-eval's own for PEFT loading
the same adapter; without lm-eval installed the command says how to install it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from serve.serve_helpers import save_random_adapter

from lorakit.cli import main

TASKS_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"


@pytest.fixture(scope="module")
def tied(smollm2_path, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and, like SmolLM2, tied embeddings; an adapter on the
    input embedding and two projections (the case that needs the embeddings re-tied with care)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    root = tmp_path_factory.mktemp("tasks")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)).eval()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = save_random_adapter(model, root / "emb", r=4, seed=3, targets=["embed_tokens", "q_proj", "v_proj"])
    return root / "base", adapter


@pytest.fixture
def in_tasks_folder(monkeypatch):
    monkeypatch.chdir(TASKS_DIR)  # the YAMLs' data_files are relative to the working folder, as in lm-eval


def test_eval_tasks_prints_and_reports_lm_evals_own_scores(tied, tmp_path, capsys, in_tasks_folder):
    import lm_eval
    from lm_eval.tasks import TaskManager

    base, adapter = tied
    out = tmp_path / "report"
    code = main(["eval", "--base", str(base), "--adapter", f"emb={adapter}", "--tasks", "tiny_mc,tiny_rolling",
                 "--include-path", str(TASKS_DIR), "--out", str(out), "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "| task | metric | base | emb (Δ) |" in printed and "| tiny_mc | acc ↑ |" in printed
    report = json.loads((out / "report.json").read_text())
    results = report["lm_eval"]["results"]
    assert set(results) == {"tiny_mc", "tiny_rolling"} and report["lm_eval"]["lm_eval_version"] == "0.4.13"
    assert "lm-evaluation-harness" in (out / "report.md").read_text()
    page = (out / "report.html").read_text()  # the self-contained page has the same numbers
    value = results["tiny_mc"]["acc"]["values"]["emb"]
    assert f'data-task="tiny_mc" data-metric="acc" data-model="emb" data-value="{value!r}"' in page
    assert not (out / "report.png").exists()  # the chart is of --data's measures
    # The oracle: lm-eval's own hf model with PEFT loading the same adapter (the base is compared the
    # same way in tests/serve/test_lm_eval.py).
    args = {"pretrained": str(base), "dtype": "float32", "device": "cpu", "peft": str(adapter)}
    theirs = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=["tiny_mc", "tiny_rolling"],
                                     task_manager=TaskManager(include_path=str(TASKS_DIR)))["results"]
    assert results["tiny_mc"]["acc"]["values"]["emb"] == theirs["tiny_mc"]["acc,none"]
    assert results["tiny_mc"]["acc_norm"]["values"]["emb"] == theirs["tiny_mc"]["acc_norm,none"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert results["tiny_rolling"][metric]["values"]["emb"] == pytest.approx(
            theirs["tiny_rolling"][f"{metric},none"], rel=1e-5)
    values = results["tiny_rolling"]["bits_per_byte"]["values"]
    assert abs(values["emb"] - values["base"]) > 1e-3  # the adapter changes the scores
    assert results["tiny_rolling"]["bits_per_byte"]["higher_is_better"] is False


def test_eval_tasks_with_data_puts_both_in_one_report(tied, tmp_path, capsys, in_tasks_folder):
    base, adapter = tied
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": f" {w}"}) + "\n"
                            for w in ("yes", "no", "maybe")))
    out = tmp_path / "report"
    code = main(["eval", "--base", str(base), "--adapter", f"emb={adapter}", "--data", str(data), "--tasks", "tiny_gen",
                 "--include-path", str(TASKS_DIR), "--out", str(out), "--quiet", "--no-forgetting",
                 "--max-new-tokens", "4", "--limit", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and "answer loss" in printed and "| tiny_gen | exact_match ↑ |" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["models"][1]["name"] == "emb" and "loss" in report["models"][1]
    assert report["lm_eval"]["limit"] == 2 and "exact_match" in report["lm_eval"]["results"]["tiny_gen"]


def test_eval_tasks_errors_say_what_to_do(tied, tmp_path, capsys, monkeypatch, in_tasks_folder):
    base, adapter = tied
    assert main(["eval", "--base", str(base), "--tasks", "tiny_mcq", "--include-path", str(TASKS_DIR)]) == 2
    assert "lm-eval knows no task or group of that name; did you mean tiny_mc" in capsys.readouterr().err
    assert main(["eval", "--base", str(base)]) == 2
    assert "give --data FILE, --tasks NAME[,NAME] (lm-eval), or both" in capsys.readouterr().err
    assert main(["eval", "--base", str(base), "--tasks", "tiny_mc", "--include-path", str(tmp_path / "none")]) == 2
    assert "no such folder" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    assert main(["eval", "--base", str(base), "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err
    assert "lm-evaluation-harness, which is not installed; install it with: pip install 'lorakit[lm-eval]'" in err
    assert os.getcwd() == str(TASKS_DIR)
