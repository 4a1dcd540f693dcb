"""LoRA on mixture-of-experts models against PEFT 0.21.2: selection, files both ways, gradients, merging.

Six transformers 5 architectures (tests/moe_models.py). "all-linear" is PEFT's selection (experts and
router on the Qwen2-MoE family and Mixtral, attention and shared experts only on Qwen2-MoE and
gpt-oss); "experts" targets the expert weights explicitly with ``target_parameters``.
"""

from __future__ import annotations

import json

import pytest
import torch
from moe_models import MOE_ARCHITECTURES, expert_parameters, make_moe, moe_ids
from peft_oracle import logits, peft_load

import lorakit
from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, merge, merge_and_unload, save_adapter, unmerge
from lorakit.adapters import experts
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.parameter import LoraParameter
from lorakit.inject import trainable_parameters

CASES = ("all_linear", "experts")


def _kwargs(arch: str, case: str) -> dict:
    if case == "all_linear":
        return dict(r=4, lora_alpha=8, target_modules="all-linear")
    return dict(r=2, lora_alpha=6, target_modules=[], target_parameters=expert_parameters(arch))


def _perturb(model: torch.nn.Module, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)


def _peft(arch: str, **kwargs):
    import peft

    return peft.get_peft_model(make_moe(arch), peft.LoraConfig(**kwargs))


def _lora_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k.replace(".default", ""): tuple(v.shape) for k, v in state.items() if "lora_" in k}


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_all_linear_selects_what_peft_selects(arch, capsys):
    reference = _peft(arch, r=4, target_modules="all-linear")
    ours = lorakit.get_peft_model(make_moe(arch), LoraConfig(r=4, target_modules="all-linear"))
    assert ours.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()
    assert _lora_keys(ours.model.state_dict(), "base_model.model.") == _lora_keys(reference.state_dict())
    reference.print_trainable_parameters()
    expected = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == expected
    adapted_experts = any(isinstance(m, LoraParameter) and m.is_experts for m in ours.model.modules())
    assert adapted_experts == (arch not in ("gpt_oss", "qwen2_moe"))  # PEFT's own rule
    if adapted_experts:  # the config PEFT would save: leaf names, the expert parameters, gate_up at 2r
        config = ours.peft_config["default"]
        assert config.target_parameters == ["down_proj", "gate.weight", "gate_up_proj"]
        assert config.rank_pattern == {r".*\.gate_up_proj": 8} and config.alpha_pattern == {r".*\.gate_up_proj": 16}


def test_reference_count_on_the_documented_qwen3_moe():
    """REFERENCE.md: all-linear on a tiny Qwen3-MoE (H 64, 4 experts, moe I 32, r 4) trains 15,392."""
    import transformers as tf

    config = tf.Qwen3MoeConfig(vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               num_experts=4, num_experts_per_tok=2)
    model = lorakit.get_peft_model(tf.Qwen3MoeForCausalLM(config), LoraConfig(r=4, target_modules="all-linear"))
    assert model.get_nb_trainable_parameters()[0] == 15_392


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_peft_saved_loads_in_lorakit_and_back(arch, case, tmp_path):
    ids = moe_ids()
    reference = _peft(arch, init_lora_weights=False, **_kwargs(arch, case)).eval()
    _perturb(reference)
    expected = logits(reference, ids)
    assert not torch.allclose(expected, logits(make_moe(arch), ids), atol=1e-3)
    reference.save_pretrained(tmp_path / "peft")

    ours = make_moe(arch)
    load_adapter(ours, tmp_path / "peft", trainable=True)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    assert trainable_parameters(ours) == reference.get_nb_trainable_parameters()

    save_adapter(ours, tmp_path / "ours")
    from safetensors import safe_open

    shapes = {}
    for folder in ("peft", "ours"):
        with safe_open(str(tmp_path / folder / "adapter_model.safetensors"), "pt") as f:
            shapes[folder] = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes["ours"] == shapes["peft"]
    ours_cfg, peft_cfg = (json.loads((tmp_path / f / "adapter_config.json").read_text()) for f in ("ours", "peft"))
    assert set(ours_cfg) == set(peft_cfg)
    for key in ("target_parameters", "rank_pattern", "alpha_pattern", "r", "lora_alpha"):
        assert ours_cfg[key] == (sorted(peft_cfg[key]) if isinstance(peft_cfg[key], list) else peft_cfg[key])
    assert sorted(ours_cfg["target_modules"]) == sorted(peft_cfg["target_modules"])
    torch.testing.assert_close(logits(peft_load(make_moe(arch), tmp_path / "ours"), ids), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_lorakit_saved_loads_in_peft(arch, case, tmp_path):
    ids = moe_ids(2)
    ours = make_moe(arch)
    add_adapter(ours, LoraConfig(init_lora_weights=False, **_kwargs(arch, case)))
    _perturb(ours, seed=3)
    expected = logits(ours, ids)
    save_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(peft_load(make_moe(arch), tmp_path), ids), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_gradients_of_every_factor_equal_peft(arch, tmp_path):
    ids = moe_ids(4, (2, 12))
    kwargs = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"] if arch != "deepseek_v3" else ["o_proj"],
                  target_parameters=expert_parameters(arch) + (["router.weight"] if arch == "gpt_oss" else []))
    reference = _peft(arch, init_lora_weights=False, **kwargs)
    _perturb(reference)
    reference.save_pretrained(tmp_path)
    ours = make_moe(arch)
    load_adapter(ours, tmp_path, trainable=True)
    for model in (reference, ours):
        model.train()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {k.removeprefix("base_model.model."): p.grad for k, p in reference.named_parameters() if p.requires_grad}
    ours_grads = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    assert set(grads) == set(ours_grads) and len(grads) >= 8
    for key, grad in grads.items():
        assert grad.abs().sum() > 0, key
        torch.testing.assert_close(ours_grads[key], grad, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("arch", MOE_ARCHITECTURES)
def test_merged_equals_unmerged_equals_peft_merge(arch, tmp_path):
    ids = moe_ids(5)
    ours = make_moe(arch)
    original = {k: v.clone() for k, v in ours.state_dict().items()}
    add_adapter(ours, LoraConfig(init_lora_weights=False, r=3, lora_alpha=5, target_modules="all-linear",
                                 target_parameters=expert_parameters(arch)))
    _perturb(ours)
    expected = logits(ours, ids)
    save_adapter(ours, tmp_path)
    merge(ours)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)
    once = {k: v.clone() for k, v in ours.state_dict().items()}
    merge(ours)  # twice changes nothing
    assert all(torch.equal(v, once[k]) for k, v in ours.state_dict().items())
    unmerge(ours)
    torch.testing.assert_close(logits(ours, ids), expected, rtol=1e-5, atol=1e-5)

    reference = peft_load(make_moe(arch), tmp_path).merge_and_unload()
    plain = merge_and_unload(ours)
    assert not [m for m in plain.modules() if isinstance(m, LoraLayer)]
    assert set(plain.state_dict()) == set(original)
    assert plain.config._experts_implementation == "grouped_mm"  # lorakit's implementation handed back
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(logits(plain, ids), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_and_delete_restore_the_base():
    ids = moe_ids()
    model = make_moe("qwen3_moe")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = logits(model, ids)
    add_adapter(model, LoraConfig(init_lora_weights=False, target_parameters=expert_parameters("qwen3_moe")))
    assert model.config._experts_implementation == experts.IMPLEMENTATION
    with lorakit.disabled(model):
        torch.testing.assert_close(logits(model, ids), base, rtol=1e-5, atol=1e-6)
    merge(model)
    unmerge(model)
    lorakit.delete_adapter(model, "default")
    assert model.config._experts_implementation == "grouped_mm"
    assert set(model.state_dict()) == set(before)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_two_adapters_on_the_experts_add_up_and_switch():
    ids = moe_ids()
    model = make_moe("mixtral")
    add_adapter(model, LoraConfig(init_lora_weights=False, r=2, target_parameters=expert_parameters("mixtral")))
    add_adapter(model, LoraConfig(init_lora_weights=False, r=4, target_parameters=expert_parameters("mixtral")),
                "other", activate=False)
    _perturb(model)
    outputs = {}
    for names in (["default"], ["other"], ["default", "other"]):
        lorakit.set_active(model, names)
        outputs[tuple(names)] = logits(model, ids)
    merge(model, ["default", "other"])
    torch.testing.assert_close(logits(model, ids), outputs[("default", "other")], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outputs[("default",)], outputs[("other",)])


# -- what is refused, and why ------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_parameters=["mlp.experts.gate_up_proj"], lora_dropout=0.1), "lora_dropout must be 0"),
    (dict(target_modules="all-linear", lora_dropout=0.05), "lora_dropout must be 0"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"], use_dora=True), "DoRA is not supported on target param"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"], lora_bias=True), "lora_bias is not supported"),
    (dict(target_parameters=["mlp.experts.up_proj"]), "matches no parameter.*closest"),
    (dict(target_parameters=["mlp.experts.gate_up_proj_bias"]), "only the weights"),
    (dict(target_modules=["q_proj", "gate_proj"]), "not up_proj.*fused"),
])
def test_refused_with_a_message(kwargs, message):
    arch = "gpt_oss" if "bias" in str(kwargs.get("target_parameters")) else "qwen3_moe"
    model = make_moe(arch)
    before = dict(model.named_modules())
    with pytest.raises(LorakitError, match=message):
        add_adapter(model, LoraConfig(**kwargs))
    assert dict(model.named_modules()) == before  # refused before any layer changed
    assert model.config._experts_implementation == "grouped_mm"


def test_a_parameter_of_a_module_also_in_target_modules_is_refused_first():
    model = make_moe("qwen3_moe")
    before = dict(model.named_modules())
    with pytest.raises(LorakitError, match="also targeted by target_modules"):
        add_adapter(model, LoraConfig(target_modules=["v_proj"], target_parameters=["self_attn.v_proj.weight"]))
    assert dict(model.named_modules()) == before


def test_target_parameters_must_be_a_list_and_the_same_across_adapters():
    with pytest.raises(LorakitError, match="list of parameter names"):
        LoraConfig(target_parameters="mlp.experts.gate_up_proj")
    model = make_moe("olmoe")
    add_adapter(model, LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]))
    with pytest.raises(LorakitError, match="same ones"):
        add_adapter(model, LoraConfig(target_parameters=expert_parameters("olmoe")), "second")


def test_3d_parameter_outside_the_experts_interface_is_refused():
    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 4, 5))

        def forward(self, x):
            return torch.einsum("eoi,ni->neo", self.weight, x)

    model = torch.nn.Sequential(Stack())
    with pytest.raises(LorakitError, match="experts interface.*does not materialise"):
        add_adapter(model, LoraConfig(target_parameters=["0.weight"]))


def test_a_2d_parameter_of_any_module_matches_peft(tmp_path):
    """target_parameters on a router's (E, H) weight, and on a plain Linear's weight."""
    ids = moe_ids(3)
    kwargs = dict(r=2, lora_alpha=2, target_parameters=["mlp.gate.weight", "self_attn.v_proj.weight"])
    reference = _peft("qwen3_moe", init_lora_weights=False, **kwargs).eval()
    _perturb(reference)
    reference.save_pretrained(tmp_path)
    ours = make_moe("qwen3_moe")
    load_adapter(ours, tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert ours.config._experts_implementation == "grouped_mm"  # no expert weight: nothing rerouted
