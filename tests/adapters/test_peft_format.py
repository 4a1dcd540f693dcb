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


def test_file_parameters_and_expert_factors_of_a_peft_saved_moe_adapter(tmp_path):
    """PEFT 0.21.2 all-linear on a Qwen3-MoE: experts (gate_up at rank 2r by PEFT's MoE rewrite, down_proj)
    and the router as target parameters; read back without a model, each expert's ΔW is PEFT's merge."""
    import peft
    from moe_models import make_moe

    base = make_moe("qwen3_moe")
    reference = peft.get_peft_model(make_moe("qwen3_moe"), peft.LoraConfig(r=2, lora_alpha=6, target_modules="all-linear",
                                                                            init_lora_weights=False))
    reference.save_pretrained(tmp_path)
    config, factors = fmt.read_factors(tmp_path)
    layer = "model.layers.1.mlp"
    parameters = fmt.file_parameters(list(factors), config.target_parameters)
    assert {m: p for m, p in parameters.items() if m.startswith(layer)} == {
        f"{layer}.experts.base_layer": f"{layer}.experts.gate_up_proj", f"{layer}.experts": f"{layer}.experts.down_proj",
        f"{layer}.gate": f"{layer}.gate.weight"}
    assert not any(".self_attn." in m for m in parameters)  # modules stay modules
    gate_up, down, router = (factors[f"{layer}.{m}"] for m in ("experts.base_layer", "experts", "gate"))
    assert (gate_up.experts, gate_up.rank, gate_up.scale) == (4, 4, 12 / 4)  # rank_pattern / alpha_pattern: 2r, 2·alpha
    assert (down.experts, down.rank, down.scale) == (4, 2, 6 / 2) and (router.experts, router.rank) == (1, 2)
    assert fmt.parameter_rank(config, f"{layer}.experts.down_proj", 8) == (2, 4)
    assert fmt.parameter_rank(config, f"{layer}.experts.down_proj", 7) == (7, 1)  # no multiple: as the tensors say
    assert fmt.parameter_rank(config, None, 8) == (8, 1)

    merged = reference.merge_and_unload().state_dict()
    plain = base.state_dict()
    for name, part in (("gate_up_proj", gate_up), ("down_proj", down)):
        key = f"{layer}.experts.{name}"
        for e in range(4):  # (E, out, in): expert e's own update
            torch.testing.assert_close(part.expert(e).delta().float(), merged[key][e] - plain[key][e],
                                       rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(router.delta().float(), merged[f"{layer}.gate.weight"] - plain[f"{layer}.gate.weight"],
                               rtol=1e-4, atol=1e-6)
