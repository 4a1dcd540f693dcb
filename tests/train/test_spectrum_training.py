"""Spectrum in training: ``method: spectrum`` trains only the selected matrices in full, and
``targets: spectrum:N`` puts LoRA only on them; both resume exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train.train_helpers import read_jsonl, tiny_config, tiny_model_dir

from lorakit import spectrum
from lorakit.errors import LorakitError
from lorakit.train.config import RunConfig, load_config
from lorakit.train.loop import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def selected(model_dir, tmp_path_factory) -> list[str]:
    # 2 layers: top 50 % keeps int(2 · 50 / 100) = 1 matrix of each of the 7 module types.
    results = spectrum.scan(model_dir, cache_dir=tmp_path_factory.mktemp("cache"))
    modules = spectrum.selected_modules(results, 50)
    assert len(modules) == 7
    return modules


def run_config(tmp: Path, model_dir: str, adapter: dict, **train_settings) -> RunConfig:
    mapping = tiny_config(tmp, model_dir, **train_settings)
    mapping["adapter"].update(adapter)
    return RunConfig.from_dict(mapping)


def base_params(model_dir: str) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())


def test_spectrum_run_trains_only_the_selected_tensors(tmp_path, model_dir, selected, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    cfg = run_config(tmp_path, model_dir, {"method": "spectrum", "targets": "spectrum:50"}, max_steps=4)
    result = train(cfg, quiet=True)
    assert result.stopped == "completed"
    saved = load_file(str(result.adapter / spectrum.WEIGHTS_NAME))
    expected = sorted([f"{m}.weight" for m in selected] + ["model.embed_tokens.weight"])  # tied with the head
    assert sorted(saved) == expected
    config = json.loads((result.adapter / spectrum.CONFIG_NAME).read_text())
    assert config["method"] == "spectrum" and config["top_percent"] == 50 and config["tensors"] == expected
    base = base_params(model_dir)
    for name, tensor in saved.items():
        assert not torch.equal(tensor, base[name]), f"{name} did not train"

    # Everything else is the base: applying the saved tensors to a fresh base rebuilds the trained model.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert spectrum.load_spectrum(model, result.adapter) == expected
    for name, param in model.named_parameters():
        assert torch.equal(param, saved[name] if name in saved else base[name]), name
    assert not (result.adapter / "adapter_model.safetensors").exists()


def test_spectrum_run_without_embeddings_resumes_bit_identically(tmp_path, model_dir, selected, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    adapter = {"method": "spectrum", "targets": selected, "spectrum_embeddings": False}
    settings = dict(max_steps=5, save_every=100)
    straight = train(run_config(tmp_path / "a", model_dir, adapter, **settings), quiet=True)

    def stop_at_2(event, run):
        if event == "step_start" and run.state.step == 2:
            raise KeyboardInterrupt

    cut = run_config(tmp_path / "b", model_dir, adapter, **settings)
    assert train(cut, callbacks=[stop_at_2], quiet=True).stopped == "interrupted"
    assert sorted(load_file(str(cut_checkpoint(cut) / spectrum.WEIGHTS_NAME))) == sorted(f"{m}.weight" for m in selected)
    cut.resume = "auto"
    second = train(cut, quiet=True)
    assert second.step == 5
    assert [r["loss"] for r in read_jsonl(second.output / "metrics.jsonl") if "loss" in r] == \
           [r["loss"] for r in read_jsonl(straight.output / "metrics.jsonl") if "loss" in r]
    a = load_file(str(straight.adapter / spectrum.WEIGHTS_NAME))
    b = load_file(str(second.adapter / spectrum.WEIGHTS_NAME))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cut_checkpoint(cfg: RunConfig) -> Path:
    from lorakit.train import checkpoints as ckpt

    return ckpt.list_checkpoints(Path(cfg.output) / "checkpoints")[-1]


def test_lora_on_spectrum_targets_is_a_peft_adapter_on_those_modules(tmp_path, model_dir, selected, monkeypatch):
    from peft_oracle import logits, peft_load
    from transformers import AutoModelForCausalLM

    from lorakit.adapter_io import load_adapter

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    result = train(run_config(tmp_path, model_dir, {"targets": "spectrum:50"}, max_steps=3, lr=5e-2), quiet=True)
    config = json.loads((result.adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(selected)
    keys = load_file(str(result.adapter / "adapter_model.safetensors"))
    assert {k.split(".lora_")[0].removeprefix("base_model.model.") for k in keys} == set(selected)
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_adapter(ours, result.adapter)
    theirs = peft_load(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), result.adapter)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (["adapter.method=spectrum"], "method: spectrum needs the matrices to train"),
    (["adapter.targets=spectrum:0"], r"expected spectrum:N with N a percentage in \(0, 100\]"),
    (["adapter.targets=spectrum:lots"], "expected spectrum:N"),
    (["adapter.method=spectrum", "adapter.targets=spectrum:25", "adapter.quantize=nf4"],
     "cannot be combined with quantize: nf4"),
])
def test_bad_spectrum_settings_are_named(overrides, message):
    with pytest.raises(LorakitError, match=message):
        load_config(None, overrides)


def test_a_selection_of_nothing_is_refused_at_start(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(LorakitError, match=r"spectrum:10 selects no matrix .* raise the percentage"):
        train(run_config(tmp_path, model_dir, {"targets": "spectrum:10"}), quiet=True)


def test_a_spectrum_output_is_not_mistaken_for_an_adapter(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    from lorakit.adapter_io import load_adapter, load_adapters

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spectrum.freeze_for_spectrum(model, ["model.layers.0.mlp.down_proj"], train_embeddings=False)
    spectrum.save_spectrum(model, tmp_path / "out")
    for load in (load_adapter, load_adapters):
        with pytest.raises(LorakitError, match="holds a Spectrum run's trained matrices.*load_spectrum"):
            load(model, tmp_path / "out")


def test_the_printed_yaml_snippet_is_a_valid_training_config(model_dir, selected, tmp_path):
    import yaml

    results = spectrum.scan(model_dir, cache_dir=tmp_path)
    adapter = RunConfig.from_dict(yaml.safe_load(spectrum.yaml_snippet(results, 50, model_dir))).adapter
    assert adapter.method == "spectrum" and adapter.targets == selected
