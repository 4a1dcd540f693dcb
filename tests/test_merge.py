"""Merging on whole models: merged == unmerged, idempotent, NaN refused, unload restores."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits

from lorakit import LoraConfig, LorakitError, add_adapter, merge, merge_and_unload, unload, unmerge
from lorakit.adapters.lora import LoraLayer


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_merged_equals_unmerged_and_unmerge_restores(arch, input_ids):
    model = make_tiny(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    embed = "wte" if arch == "gpt2" else "embed_tokens"
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    add_adapter(model, LoraConfig(r=2, target_modules=[embed], init_lora_weights=False), "emb", activate=False)
    from lorakit import set_active

    set_active(model, ["default", "emb"])
    expected = logits(model, input_ids)
    merge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    once = {k: v.clone() for k, v in model.state_dict().items()}
    merge(model)
    assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
    unmerge(model)
    torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-5)
    restored = unload(model)
    assert set(restored.state_dict()) == set(original)
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=1e-6)


def test_merge_and_unload_gives_the_plain_architecture(input_ids):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
                                  init_lora_weights=False))
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    expected = logits(model, input_ids)
    plain = merge_and_unload(model)
    assert not [m for m in plain.modules() if isinstance(m, LoraLayer)]
    assert set(plain.state_dict()) == set(make_tiny("llama").state_dict())
    torch.testing.assert_close(logits(plain, input_ids), expected, rtol=1e-5, atol=1e-5)


def test_nan_adapter_is_refused_before_any_weight_changes():
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():  # poison only the last adapted layer: earlier ones must stay unmerged too
        model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match="NaN or inf"):
        merge(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(not m.merged for m in model.modules() if isinstance(m, LoraLayer))
