"""The training config: YAML + overrides, strict keys with suggestions, value checks, the schedule."""

from __future__ import annotations

import math

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.config import RunConfig, TrainConfig, apply_override, load_config
from lorakit.train.run import lr_at


def write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_minimal_yaml_gets_defaults(tmp_path):
    config = load_config(write(tmp_path, "model: some/model\ndata:\n  train: a.jsonl\n"))
    assert config.model == "some/model" and config.data.train == "a.jsonl"
    assert (config.adapter.method, config.adapter.r, config.adapter.targets) == ("lora", 16, "all-linear")
    assert (config.train.lr, config.train.schedule, config.train.epochs) == (2e-4, "cosine", 1)


def test_design_example_parses_and_yaml11_numbers_are_numbers(tmp_path):
    text = """
model: smollm2-135m-instruct
data: {train: t.jsonl, eval: e.jsonl, format: auto, max_length: 512, packing: true}
adapter: {method: lora, r: 16, alpha: 32, dropout: 0.05, targets: all-linear}
train: {epochs: 2, batch_size: 8, grad_accum: 1, lr: 2e-4, schedule: cosine, warmup_steps: 10, eval_every: 50, seed: 0}
output: runs/quickstart
"""
    config = load_config(write(tmp_path, text))
    assert config.train.lr == pytest.approx(2e-4) and isinstance(config.train.lr, float)
    assert config.train.eval_every == 50 and config.output == "runs/quickstart"


@pytest.mark.parametrize(("text", "suggestion"), [
    ("outptu: x\n", "did you mean 'output'"),
    ("train:\n  lrr: 0.1\n", "did you mean 'train.lr'"),
    ("adapter:\n  rank: 8\n", "unknown key 'adapter.rank'"),
    ("data:\n  max_lenght: 8\n", "did you mean 'max_length'"),
])
def test_unknown_keys_suggest(tmp_path, text, suggestion):
    with pytest.raises(LorakitError, match=suggestion):
        load_config(write(tmp_path, text))


def test_overrides_are_parsed_as_yaml(tmp_path):
    config = load_config(write(tmp_path, "data: {train: a.jsonl}\n"),
                         ["train.lr=1e-3", "adapter.targets=[q_proj, v_proj]", "data.max_length=64",
                          "output=elsewhere", "train.max_grad_norm=null"])
    assert config.train.lr == pytest.approx(1e-3)
    assert config.adapter.targets == ["q_proj", "v_proj"]
    assert config.data.max_length == 64 and config.output == "elsewhere" and config.train.max_grad_norm is None


@pytest.mark.parametrize(("override", "message"), [
    ("train.schedule=cosin", "did you mean 'cosine'"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1"),
    ("train.lr=fast", "train.lr: expected a number"),
    ("adapter.dropout=1.5", r"adapter.dropout: expected a value in \[0, 1\)"),
    ("train.report_to=neptune", "train.report_to: expected one of"),
    ("trian.lr=1", "did you mean 'train'"),
    ("lr", "expected key=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(LorakitError, match=message):
        load_config(None, [override])


def test_methods_map_to_the_adapter_core():
    dora = load_config(None, ["adapter.method=dora"]).adapter
    assert dora.to_lora_config().use_dora and not dora.quantized
    qlora = load_config(None, ["adapter.method=qlora"]).adapter
    assert qlora.quantized and not qlora.to_lora_config().use_dora
    assert load_config(None, ["adapter.quantize=nf4", "adapter.method=dora"]).adapter.quantized  # QDoRA
    spectrum = load_config(None, ["adapter.method=spectrum", "adapter.targets=spectrum:25"]).adapter
    assert spectrum.spectrum_top == 25 and not spectrum.quantized
    with pytest.raises(LorakitError, match="pissa needs a dense base"):
        load_config(None, ["adapter.method=qlora", "adapter.init=pissa"])


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(LorakitError, match=r"run.yaml: line \d+, column \d+ not valid YAML"):
        load_config(write(tmp_path, "model: x\ndata: [unclosed\n"))


def test_cli_prints_error_without_traceback(tmp_path, capsys):
    path = write(tmp_path, "data: {train: a.jsonl}\ntrain: {epocs: 2}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'train.epochs'" in err and "Traceback" not in err


def test_resolved_config_round_trips():
    config = load_config(None, ["data.train=a.jsonl", "train.lr=0.01"])
    assert RunConfig.from_dict(config.to_dict()) == config


def test_apply_override_creates_sections():
    values: dict = {}
    apply_override(values, "train.epochs=3")
    assert values == {"train": {"epochs": 3}}


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, 20, cfg) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    linear = TrainConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, 4, linear) for s in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert lr_at(99, 4, TrainConfig(lr=0.5, warmup_steps=0, schedule="constant")) == 0.5


def test_docs_reference_lists_every_key():
    import dataclasses
    from pathlib import Path

    from lorakit.data.config import DataConfig
    from lorakit.train.config import AdapterConfig

    text = (Path(__file__).resolve().parents[2] / "docs" / "train.md").read_text()
    for cls in (RunConfig, DataConfig, AdapterConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"docs/train.md does not document {cls.__name__}.{f.name}"


def test_overrides_do_not_change_the_base_mapping():
    base = {"data": {"train": "a.jsonl"}, "train": {"lr": 0.1}}
    config = load_config(None, ["train.lr=0.5"], base=base)
    assert config.train.lr == 0.5 and base == {"data": {"train": "a.jsonl"}, "train": {"lr": 0.1}}
