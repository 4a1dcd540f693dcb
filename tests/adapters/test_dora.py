"""DoRA: equal to PEFT's in outputs and gradients, loads both ways, merged == unmerged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

import lorakit
from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, save_adapter
from lorakit.adapters import dora
from lorakit.adapters.lora import LoraLinear

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_fc"], "qwen2": ["q_proj", "v_proj", "down_proj"]}


def _grads(model, strip: str = "") -> dict[str, torch.Tensor]:
    """Gradients by PEFT file key (adapter name and wrapper prefixes removed)."""
    out = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            key = name.removeprefix(strip).replace(".default", "").replace("lora_magnitude_vector.weight",
                                                                           "lora_magnitude_vector")
            out[key] = param.grad
    return out


@pytest.mark.parametrize("arch", list(TARGETS))
def test_outputs_and_gradients_equal_peft(arch, tmp_path, input_ids):
    import peft

    reference = peft.get_peft_model(make_tiny(arch), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True, init_lora_weights=False)).eval()
    with torch.no_grad():  # a trained-looking magnitude, not just the initial norm
        for name, param in reference.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    reference.save_pretrained(tmp_path)
    ours = make_tiny(arch)  # eval(): no dropout anywhere, so both runs are deterministic
    load_adapter(ours, tmp_path, trainable=True)
    torch.testing.assert_close(logits(ours, input_ids), logits(reference, input_ids), rtol=1e-5, atol=1e-5)

    reference(input_ids=input_ids, labels=input_ids).loss.backward()
    ours(input_ids=input_ids, labels=input_ids).loss.backward()
    theirs, mine = _grads(reference, "base_model.model."), _grads(ours)
    assert set(mine) == set(theirs) and any("lora_magnitude_vector" in k for k in mine)
    for key in theirs:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_our_dora_adapter_loads_in_peft(arch, tmp_path, input_ids):
    model = make_tiny(arch)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True,
                                  init_lora_weights=False))
    expected = logits(model, input_ids)
    save_adapter(model, tmp_path)
    torch.testing.assert_close(logits(peft_load(make_tiny(arch), tmp_path), input_ids), expected,
                               rtol=1e-5, atol=1e-5)


def test_fresh_dora_is_identity_and_norm_formula(input_ids):
    model = make_tiny("llama")
    expected = logits(model, input_ids)
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-6, atol=1e-6)
    layer = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    explicit = (layer.base_layer.weight + layer.delta_weight("default")).norm(dim=1)
    torch.testing.assert_close(dora.row_norm(layer, "default"), explicit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merged_equals_unmerged(arch, input_ids):
    model = make_tiny(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[arch], use_dora=True,
                                  init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.2)
    expected = logits(model, input_ids)
    lorakit.merge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    for key, value in lorakit.unload(model).state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-5)


def test_dora_with_dropout_keeps_base_path_exact():
    """Dropout acts on the low-rank path only: with B = 0 a DoRA layer in train mode is the base."""
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    layer = LoraLinear(base)
    from lorakit.adapters.lora import AdapterOptions

    layer.add("d", AdapterOptions(r=2, alpha=4, dropout=0.5, use_dora=True))
    layer.set_active(["d"])
    layer.train()
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), base(x), rtol=1e-6, atol=1e-6)


def test_two_active_dora_adapters_are_refused(input_ids):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], use_dora=True), "a")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], use_dora=True), "b", activate=False)
    lorakit.set_active(model, ["a", "b"])
    with pytest.raises(LorakitError, match="active together"):
        model(input_ids)
    with pytest.raises(LorakitError, match="embedding"):
        add_adapter(make_tiny("llama"), LoraConfig(target_modules=["embed_tokens"], use_dora=True))
