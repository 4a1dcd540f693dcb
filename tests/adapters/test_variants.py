"""Variants keep their state where state_dict() and .to() see it, never in a layer's __dict__."""

from __future__ import annotations

import torch
from conftest import make_tiny
from peft_oracle import logits
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters.dora import DORA
from lorakit.adapters.lora import AdapterOptions, wrap
from lorakit.adapters.variants import LORA


def _train_a_little(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_pissa_starting_factors_travel_with_the_state_dict(tmp_path, input_ids):
    """A randomised PiSSA init differs per run; loading the state dict brings the first run's A₀, B₀."""
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa_niter_2")
    trained, again = make_tiny("llama"), make_tiny("llama")
    torch.manual_seed(1)
    add_adapter(trained, config)
    _train_a_little(trained)
    torch.manual_seed(2)  # another random subspace: other A₀, B₀ and another residual base
    add_adapter(again, config)
    assert any(k.endswith("lora_initial.default.A") for k in trained.state_dict())
    again.load_state_dict(trained.state_dict())

    save_adapter(trained, tmp_path / "one", pissa_to_lora=True)
    save_adapter(again, tmp_path / "two", pissa_to_lora=True)
    one, two = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("one", "two"))
    assert sorted(one) == sorted(two)
    for key in one:
        assert torch.equal(one[key], two[key]), key
    torch.testing.assert_close(logits(again, input_ids), logits(trained, input_ids), rtol=0, atol=0)


def test_dora_state_is_declared_and_moves_with_to(input_ids):
    base = nn.Linear(16, 12)
    layer = wrap(base)
    fresh_attrs = set(layer.__dict__)
    layer.add("d", AdapterOptions(r=4, alpha=8, init=False, use_dora=True))
    layer.add("p", AdapterOptions(r=2, alpha=2, init="pissa"))
    layer.set_active(["d"])
    assert layer.variants == {"d": DORA, "p": LORA}
    x = torch.randn(3, 16)
    expected = layer(x)
    original = base.weight.detach().clone()
    layer.merge(["d"])
    assert layer.lora_dora["d"].merge_scale is not None and layer.lora_dora["d"].weight_norm_sq is not None
    assert set(layer.__dict__) == fresh_attrs  # nothing hidden in the instance dict
    layer.to(torch.float64)
    assert layer.lora_dora["d"].merge_scale.dtype == torch.float64  # .to() sees the merge state
    assert layer.lora_initial["p"].A.dtype == torch.float64
    torch.testing.assert_close(layer(x.double()).float(), expected, rtol=1e-5, atol=1e-5)  # merged, fp64
    layer.unmerge()
    assert layer.lora_dora["d"].merge_scale is None
    torch.testing.assert_close(base.weight.float(), original, rtol=0, atol=1e-6)
    layer.delete("d")
    assert "d" not in layer.lora_dora and "d" not in layer.lora_magnitude_vector and "d" not in layer.variants
    assert not any(k.startswith("lora_dora") for k in layer.state_dict())  # runtime state only: files unchanged


def test_merged_dora_model_unmerges_exactly_after_to(input_ids):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True,
                                  init_lora_weights=False))
    expected = logits(model, input_ids)
    lorakit.merge(model)
    model.to(torch.float64)
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model.to(torch.float32), input_ids), expected, rtol=1e-5, atol=1e-5)
