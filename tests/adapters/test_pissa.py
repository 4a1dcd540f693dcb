"""PiSSA: identity at init, the principal part in B A, conversion to a plain LoRA of rank 2r."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

from lorakit import LoraConfig, add_adapter, load_adapter, save_adapter


def _train_a_little(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("init,arch", [("pissa", "llama"), ("pissa_niter_4", "llama"), ("pissa", "gpt2")])
def test_pissa_init_and_conversion(init, arch, tmp_path, input_ids):
    targets = ["c_attn", "c_fc"] if arch == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    model = make_tiny(arch)
    expected_base = logits(model, input_ids)
    weight = (model.transformer.h[0].attn.c_attn.weight.T if arch == "gpt2"
              else model.model.layers[0].self_attn.q_proj.weight).detach().clone()
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init))
    torch.testing.assert_close(logits(model, input_ids), expected_base, rtol=1e-4, atol=1e-4)  # identity
    layer = model.transformer.h[0].attn.c_attn if arch == "gpt2" else model.model.layers[0].self_attn.q_proj
    principal = layer.delta_weight("default")
    principal = principal.T if arch == "gpt2" else principal
    if init == "pissa":  # s·B A is W's best rank-4 approximation
        U, S, Vh = torch.linalg.svd(weight)
        torch.testing.assert_close(principal, (U[:, :4] * S[:4]) @ Vh[:4], rtol=1e-4, atol=1e-4)

    _train_a_little(model)
    trained = logits(model, input_ids)
    save_adapter(model, tmp_path / "converted", pissa_to_lora=True)
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["init_lora_weights"] is True
    original = make_tiny(arch)  # the untouched base: the converted adapter reproduces the PiSSA model
    load_adapter(original, tmp_path / "converted")
    torch.testing.assert_close(logits(original, input_ids), trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(peft_load(make_tiny(arch), tmp_path / "converted"), input_ids), trained,
                               rtol=1e-4, atol=1e-4)


def test_pissa_adapter_saved_as_is_loads_like_peft(tmp_path, input_ids):
    """Saved unconverted, loading redoes the SVD on the original base (PEFT does the same)."""
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    _train_a_little(model)
    trained = logits(model, input_ids)
    save_adapter(model, tmp_path)
    again = make_tiny("llama")
    load_adapter(again, tmp_path)
    torch.testing.assert_close(logits(again, input_ids), trained, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(peft_load(make_tiny("llama"), tmp_path), input_ids), trained,
                               rtol=1e-4, atol=1e-4)
