"""The PEFT format module: key mapping both ways, adapter-tensor identity, the scale, folders."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.adapters import peft_format as fmt

P = "base_model.model."


@pytest.mark.parametrize("model_key,name,want", [
    ("model.layers.0.self_attn.q_proj.lora_A.default.weight", "default", P + "model.layers.0.self_attn.q_proj.lora_A.weight"),
    ("model.layers.0.self_attn.q_proj.lora_B.other.bias", "other", P + "model.layers.0.self_attn.q_proj.lora_B.bias"),
    ("model.embed_tokens.lora_embedding_A.default", "default", P + "model.embed_tokens.lora_embedding_A"),
    ("x.q_proj.lora_magnitude_vector.default", "default", P + "x.q_proj.lora_magnitude_vector"),
    ("x.q_proj.lora_magnitude_vector.default.weight", "default", P + "x.q_proj.lora_magnitude_vector"),
    ("lm_head.modules_to_save.default.weight", "default", P + "lm_head.weight"),
    ("score.modules_to_save.b.bias", "b", P + "score.bias"),
    ("x.q_proj.lora_A.other.weight", "default", None),  # another adapter's
    ("x.q_proj.base_layer.weight", "default", None),  # the base's
    ("x.q_proj.lora_dropout.default.p", "default", None),  # not a saved part
    # PEFT 0.21.2's nested wrappers for two target_parameters of one experts module (REFERENCE.md)
    ("model.layers.0.mlp.experts.base_layer.lora_A.default.weight", "default",
     P + "model.layers.0.mlp.experts.base_layer.lora_A.weight"),
    ("model.layers.0.mlp.experts.lora_B.default.weight", "default", P + "model.layers.0.mlp.experts.lora_B.weight"),
])
def test_file_key(model_key, name, want):
    assert fmt.file_key(model_key, name) == want


@pytest.mark.parametrize("part", ["lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B",
                                  "lora_magnitude_vector"])
def test_split_file_key_inverts_part_file_key(part):
    key = fmt.part_file_key("model.layers.3.mlp.down_proj", part)
    assert fmt.split_file_key(key) == ("model.layers.3.mlp.down_proj", part)
    assert fmt.split_file_key(key.removeprefix(P)) == ("model.layers.3.mlp.down_proj", part)  # no prefix: read too


def test_split_file_key_of_other_tensors():
    assert fmt.split_file_key(P + "lm_head.weight") is None
    assert fmt.split_file_key(P + "x.q_proj.base_layer.bias") is None
    assert fmt.split_file_key(P + "x.q_proj.lora_magnitude_vector.weight") == ("x.q_proj", "lora_magnitude_vector")


def test_adapter_identity():
    assert fmt.is_adapter_tensor("x.q_proj.lora_A.default.weight")
    assert fmt.is_adapter_tensor("lm_head.modules_to_save.default.weight")
    assert fmt.is_adapter_tensor("lm_head.original_module.bias")
    assert not fmt.is_adapter_tensor("x.q_proj.base_layer.bias") and not fmt.is_adapter_tensor("x.flora_proj.bias")
    assert fmt.is_wrapper_module("x.q_proj.base_layer") and fmt.is_wrapper_module("x.q_proj.lora_magnitude_vector")
    assert fmt.is_wrapper_module("x.q_proj.lora_A.default") and not fmt.is_wrapper_module("x.q_proj")
    assert fmt.module_of("x.q_proj.lora_B.default.weight") == "x.q_proj"


def test_scaling_is_alpha_over_r_or_sqrt_r():
    assert fmt.scaling(16, 4) == 4.0
    assert fmt.scaling(16, 4, use_rslora=True) == 8.0
    assert fmt.scaling(3, 7, use_rslora=True) == 3 / math.sqrt(7)
    config = LoraConfig(r=8, lora_alpha=4, use_rslora=True, rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 32})
    assert fmt.module_scaling(config, "model.layers.0.mlp.down_proj") == 4 / math.sqrt(2)
    assert fmt.module_scaling(config, "model.layers.0.self_attn.q_proj") == 32 / math.sqrt(8)
    assert fmt.module_scaling(config, "model.layers.0.self_attn.q_proj", r=4) == 16.0


def test_read_factors_and_folders(tmp_path):
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                  init_lora_weights=False), "default")
    add_adapter(model, LoraConfig(r=2, lora_alpha=8, target_modules=["v_proj"], use_rslora=True), "b")
    save_adapter(model, tmp_path)
    assert [(n, p.relative_to(tmp_path).as_posix()) for n, p in fmt.adapter_folders(tmp_path)] == [("default", "."), ("b", "b")]
    assert fmt.adapter_folder(tmp_path, "b") == tmp_path / "b" and fmt.adapter_folders(tmp_path / "none") == []

    config, factors = fmt.read_factors(tmp_path)
    q = factors["model.layers.0.self_attn.q_proj"]
    layer = model.model.layers[0].self_attn.q_proj
    assert config.r == 4 and q.scale == 2.0 and not q.embedding and q.rank == 4
    torch.testing.assert_close(q.delta().float(), layer.delta_weight("default"))
    assert factors["model.embed_tokens"].embedding and len(factors) == 3  # q_proj in 2 layers, the embedding
    _, other = fmt.read_factors(tmp_path / "b")
    assert {f.scale for f in other.values()} == {8 / math.sqrt(2)}
    shapes, _ = fmt.read_shapes(tmp_path / "b")
    assert shapes[P + "model.layers.1.self_attn.v_proj.lora_A.weight"] == (2, 32)
