"""Evaluation: metrics, answer-token loss, batched greedy generation, base-vs-adapter reports, the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from lorakit import LoraConfig, LorakitError, add_adapter, save_adapter
from lorakit.cli import main
from lorakit.evaluate import metrics as M
from lorakit.evaluate.comparison import GENERAL_ENGLISH, compare
from lorakit.evaluate.core import EvalConfig, answer_loss, evaluate, generate, read_eval_data
from lorakit.evaluate.report import markdown, write_reports

TASK = str(Path(__file__).parents[1] / "src/lorakit/train/quickstart_eval.jsonl")
TRAIN = str(Path(__file__).parents[1] / "src/lorakit/train/quickstart.jsonl")


# -- metrics -------------------------------------------------------------------------------------


def test_builtin_metrics():
    assert M.exact_match(" Paris\n", "Paris") == 1.0 and M.exact_match("paris", "Paris") == 0.0
    assert M.normalized_match("The  Paris!", "paris") == 1.0
    assert M.contains("It is Paris, of course.", "the Paris") == 1.0 and M.contains("Rome", "Paris") == 0.0
    assert M.json_valid(' {"a": 1} ') == 1.0
    assert M.json_valid('```json\n{"a": 1}\n```') == 0.0 and M.json_valid('{"a": 1} and more') == 0.0
    assert M.looks_like_json(['{"a": 1}', "[1]", "no"]) and not M.looks_like_json(["yes", "no", "{}"])


def test_json_schema_subset():
    schema = {"type": "object", "required": ["word", "pos"], "additionalProperties": False,
              "properties": {"word": {"type": "string", "minLength": 1},
                             "pos": {"enum": ["noun", "verb"]}, "n": {"type": "integer", "minimum": 0}}}
    assert M.schema_errors({"word": "cat", "pos": "noun"}, schema) == []
    assert M.schema_errors({"word": "cat"}, schema) == ["$: missing 'pos'"]
    assert sorted(M.schema_errors({"word": "", "pos": "adj", "n": -1, "x": 1}, schema)) == sorted([
        "$: unexpected key 'x'", "$.word: length 0 outside the allowed range", "$.pos: 'adj' not in ['noun', 'verb']",
        "$.n: -1 outside [0, ∞]"])
    assert M.schema_errors([1, "a"], {"type": "array", "items": {"type": "integer"}}) == ["$[1]: expected integer, got str"]
    check = M.schema_metric(schema)
    assert check('{"word": "cat", "pos": "verb"}', "") == 1.0 and check('{"word": "cat"}', "") == 0.0


def test_user_metric_from_file_and_errors(tmp_path):
    (tmp_path / "mymetric.py").write_text(
        "def starts(prediction, reference):\n    return prediction[:1] == reference[:1]\n"
        "def boom(prediction, reference):\n    raise ValueError('no good')\n"
        "def one_arg(prediction):\n    return 1.0\n")
    name, func = M.load_user_metric(f"{tmp_path}/mymetric.py:starts")
    assert name == "starts" and M.score(name, func, "abc", "axe", "row 1") == 1.0
    with pytest.raises(LorakitError, match="has no function 'nope'"):
        M.load_user_metric(f"{tmp_path}/mymetric.py:nope")
    with pytest.raises(LorakitError, match="must accept"):
        M.load_user_metric(f"{tmp_path}/mymetric.py:one_arg")
    with pytest.raises(LorakitError, match="importing no_such_module_xyz failed"):
        M.load_user_metric("no_such_module_xyz:f")
    _, boom = M.load_user_metric(f"{tmp_path}/mymetric.py:boom")
    with pytest.raises(LorakitError, match="metric 'boom' raised ValueError: no good on data.jsonl line 3"):
        M.score("boom", boom, "x", "y", "data.jsonl line 3")


# -- a tiny model that speaks SmolLM2's tokenizer ------------------------------------------------


@pytest.fixture(scope="module")
def tiny(smollm2_path, tmp_path_factory):
    """A tiny random Llama with SmolLM2's vocabulary and tokenizer, saved as a base folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.vocab_size = 49152
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny") / "base"
    model.save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def test_answer_loss_is_the_token_mean_over_answer_tokens(tiny):
    _, model, tokenizer = tiny
    data = read_eval_data(TASK, tokenizer, EvalConfig(limit=5))
    result = answer_loss(model, data.rows, pad_token_id=2, batch_size=2)
    assert result["tokens"] == int(data.rows.trained_tokens().sum()) > 0  # the training mask, after the shift
    total = count = 0
    for i in range(len(data.rows)):  # the model's own loss, one row at a time, weighted by tokens
        ids, labels = (torch.as_tensor(a, dtype=torch.long)[None] for a in data.rows.row(i))
        n = int((labels[0, 1:] != -100).sum())
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss
        assert result["row_losses"][i] == pytest.approx(float(loss), rel=1e-4)
        total, count = total + float(loss) * n, count + n
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_training_settings_and_tokenised_rows(tiny):
    """The callable train uses: its DataConfig decides the counted tokens; tokenised rows give the loss."""
    from lorakit.data.config import DataConfig

    _, model, tokenizer = tiny
    answers = evaluate(model, tokenizer, TASK, EvalConfig(limit=3, generate=False))
    everything = evaluate(model, tokenizer, TASK, EvalConfig(limit=3, generate=False,
                                                             data=DataConfig(train_on_inputs=True)))
    assert everything["tokens"] > answers["tokens"] and everything["rows"] == answers["rows"] == 3
    rows = read_eval_data(TASK, tokenizer, EvalConfig(limit=3)).rows
    from_rows = evaluate(model, tokenizer, rows, EvalConfig())
    assert from_rows["loss"] == pytest.approx(answers["loss"], rel=1e-6) and "predictions" not in from_rows


def test_batched_left_padded_generation_equals_one_at_a_time(tiny):
    _, model, tokenizer = tiny
    data = read_eval_data(TASK, tokenizer, EvalConfig(limit=4))
    batched = generate(model, tokenizer, data.examples, data.template, batch_size=4, max_new_tokens=6)
    single = [generate(model, tokenizer, [ex], data.template, batch_size=1, max_new_tokens=6)[0] for ex in data.examples]
    assert batched == single and all(batched)


def test_compare_reports_base_adapter_and_forgetting(tiny, tmp_path):
    from lorakit.inject import set_active

    _, model, tokenizer = tiny
    model = type(model)(model.config).eval()
    model.load_state_dict(tiny[1].state_dict())
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "ad")
    config = EvalConfig(limit=3, max_new_tokens=5)
    report = compare(model, tokenizer, ["ad"], TASK, config, general_limit=3, show_progress=False)
    base, ad = report["models"]
    plain = evaluate(tiny[1], tokenizer, TASK, config)  # the base measurement is the model without adapters
    assert base["loss"] == pytest.approx(plain["loss"], rel=1e-6)
    set_active(model, ["ad"])
    alone = evaluate(model, tokenizer, TASK, config)
    assert ad["loss"] == pytest.approx(alone["loss"], rel=1e-6) and ad["loss"] != pytest.approx(base["loss"])
    assert ad["forgetting"]["delta"] == pytest.approx(ad["general_loss"] - base["general_loss"])
    assert report["metrics"] == ["exact_match", "normalized_match", "contains", "json_valid"]  # answers are JSON
    for ex, out in zip(report["examples"], plain["predictions"]):
        assert ex["outputs"]["base"] == out
    written = write_reports(report, tmp_path / "rep")
    assert [p.name for p in written] == ["report.md", "report.json", "examples.jsonl", "report.html", "report.png"]
    assert (tmp_path / "rep/report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "rep/report.md").read_text()
    assert "| answer loss ↓ |" in text and "| general-text loss ↓ |" in text and "ad (Δ)" in text
    assert json.loads((tmp_path / "rep/report.json").read_text())["models"][1]["name"] == "ad"
    assert len((tmp_path / "rep/examples.jsonl").read_text().splitlines()) == 3


def test_general_english_sample_is_bundled_with_its_notice():
    rows = [json.loads(line) for line in Path(GENERAL_ENGLISH).read_text().splitlines()]
    assert len(rows) >= 90 and all(set(r) == {"text"} and len(r["text"]) >= 100 for r in rows)
    notice = Path(GENERAL_ENGLISH).with_name("general_english_NOTICE.txt").read_text()
    assert "fortunes-min" in notice and "Regents of the University of California" in notice


# -- the command -----------------------------------------------------------------------------------


def test_cli_bad_input_is_named_and_nothing_is_written(tiny, tmp_path, capsys):
    folder, model, _ = tiny
    out = tmp_path / "rep"
    base = ["eval", "--base", str(folder), "--data", TASK, "--out", str(out), "--limit", "2", "--quiet"]
    assert main([*base[:4], str(tmp_path / "missing.jsonl"), *base[5:]]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main([*base, "--adapter", str(tmp_path / "nope")]) == 2
    assert "nope: no adapter_config.json" in capsys.readouterr().err
    (tmp_path / "m.py").write_text("def bad(prediction, reference):\n    return 1 / 0\n")
    assert main([*base, "--metric", f"{tmp_path}/m.py:bad", "--max-new-tokens", "2", "--no-forgetting"]) == 2
    err = capsys.readouterr().err
    assert "metric 'bad' raised ZeroDivisionError" in err and "quickstart_eval.jsonl line" in err
    assert "Traceback" not in err and not out.exists()



@pytest.fixture(scope="module")
def trained_adapter(smollm2_path, tmp_path_factory, one_thread):
    """A small LoRA adapter trained for ten steps on the quickstart task (JSON word definitions)."""
    from lorakit.data.collation import collate_padded
    from lorakit.data.config import DataConfig
    from lorakit.data.tokenize import tokenize_file
    from lorakit.models import load_model, load_tokenizer

    torch.manual_seed(0)
    model = load_model(str(smollm2_path), dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(str(smollm2_path))
    rows, _ = tokenize_file(TRAIN, tokenizer, DataConfig(train=TRAIN, cache=False))
    # The last six layers only: autograd stops there, so a step costs little more than a forward.
    add_adapter(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                  layers_to_transform=[24, 25, 26, 27, 28, 29]))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    shortest = sorted(range(len(rows)), key=lambda i: int(rows.lengths[i]))
    for step in range(10):
        batch = collate_padded([rows.row(i) for i in shortest[4 * step:4 * step + 4]], pad_token_id=2)
        model(**batch, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("trained") / "json-defs"
    save_adapter(model, folder, base_model_name_or_path="smollm2-135m-instruct")
    return folder


@pytest.mark.slow
def test_smollm2_eval_shows_the_trained_adapter_beats_the_base(smollm2_path, trained_adapter, tmp_path, capsys,
                                                            one_thread):
    out = tmp_path / "report"
    assert main(["eval", "--base", str(smollm2_path), "--adapter", str(trained_adapter), "--data", TASK,
                 "--limit", "4", "--max-new-tokens", "40", "--general-limit", "4", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "| answer loss ↓ |" in printed and "json-defs (Δ)" in printed
    report = json.loads((out / "report.json").read_text())
    base, adapter = report["models"]
    assert adapter["loss"] < base["loss"] - 0.5  # it learnt the task
    assert base["metrics"]["json_valid"] == 0.0 < adapter["metrics"]["json_valid"]  # the base answers in prose
    assert adapter["perplexity"] < base["perplexity"]
    assert abs(adapter["forgetting"]["relative"]) < 0.5  # ten steps on six layers: English survives
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert len(examples) == 4 and all(ex["outputs"]["base"] for ex in examples)
    for model in (base, adapter):  # every reported metric is the mean of scores of real generations
        outputs = [ex["outputs"][model["name"]] for ex in examples]
        references = [ex["reference"] for ex in examples]
        for name, func in (("exact_match", M.exact_match), ("contains", M.contains), ("json_valid", M.json_valid)):
            assert model["metrics"][name] == pytest.approx(sum(map(func, outputs, references)) / 4)
    assert "## Sample answers" in markdown({**report, "examples": examples})
    assert (out / "report.png").stat().st_size > 5000
