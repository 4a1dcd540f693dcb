"""Target selection by module names, and the adapter lifecycle on a whole model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch import nn

import lorakit
from lorakit import LoraConfig, LorakitError, add_adapter, delete_adapter, set_active
from lorakit.adapters.lora import LoraLayer
from lorakit.inject import adapter_layers, find_targets, trainable_parameters


def _adapted(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def test_names_match_exactly_or_as_dotted_suffix(tiny_llama):
    targets = find_targets(tiny_llama, LoraConfig(target_modules=["q_proj", "model.layers.1.mlp.up_proj"]))
    assert targets == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                       "model.layers.1.mlp.up_proj"]
    # a suffix must follow a dot: "proj" is not a suffix of "q_proj"'s last part
    with pytest.raises(LorakitError, match="'proj' matches no module"):
        find_targets(tiny_llama, LoraConfig(target_modules=["proj"]))


def test_regex_must_match_the_whole_name(tiny_llama):
    assert find_targets(tiny_llama, LoraConfig(target_modules=r".*\.0\.self_attn\.(q|v)_proj")) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(LorakitError, match="regex 'q_proj' matches no module"):
        find_targets(tiny_llama, LoraConfig(target_modules="q_proj"))


@pytest.mark.parametrize("arch,head", [("llama", "lm_head"), ("gpt2", "lm_head")])
def test_all_linear_never_takes_the_output_head(arch, head):
    model = make_tiny(arch)
    targets = find_targets(model, LoraConfig(target_modules="all-linear"))
    assert head not in targets
    per_layer = 7 if arch == "llama" else 4  # q k v o gate up down | c_attn c_proj c_fc c_proj
    assert len(targets) == 2 * per_layer


def test_all_linear_on_a_plain_module():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_targets(model, LoraConfig(target_modules="all-linear")) == ["0", "2"]


def test_unknown_target_names_it_and_the_closest_modules(tiny_llama):
    with pytest.raises(LorakitError) as err:
        find_targets(tiny_llama, LoraConfig(target_modules=["q_proj", "qproj", "v_proj"]))
    message = str(err.value)
    assert "'qproj' matches no module" in message and "q_proj" in message.split("closest")[1]


def test_target_that_is_not_a_linear_layer(tiny_llama):
    with pytest.raises(LorakitError, match="is a LlamaAttention"):
        find_targets(tiny_llama, LoraConfig(target_modules=["self_attn"]))


def test_exclude_modules_and_layers(tiny_llama):
    config = LoraConfig(target_modules="all-linear", exclude_modules=["down_proj", "o_proj"])
    assert not [t for t in find_targets(tiny_llama, config) if t.endswith(("down_proj", "o_proj"))]
    layers = find_targets(tiny_llama, LoraConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]))
    assert layers == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    pattern = LoraConfig(target_modules=["q_proj"], layers_to_transform=0, layers_pattern="layers")
    assert find_targets(tiny_llama, pattern) == ["model.layers.0.self_attn.q_proj"]
    with pytest.raises(LorakitError, match="layers_to_transform cannot be combined with a regex"):
        LoraConfig(target_modules=".*q_proj", layers_to_transform=[0])


def test_rank_and_alpha_patterns(tiny_llama):
    add_adapter(tiny_llama, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                       rank_pattern={"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 4},
                                       alpha_pattern={"q_proj": 2}))
    layers = dict(tiny_llama.named_modules())
    assert layers["model.layers.0.self_attn.v_proj"].options["default"].r == 2
    assert layers["model.layers.1.self_attn.q_proj"].options["default"].r == 4
    assert layers["model.layers.0.self_attn.q_proj"].options["default"].r == 8
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 2 / 8
    assert layers["model.layers.0.self_attn.v_proj"].scaling["default"] == 16 / 2


def test_modules_to_save_train_a_copy(tiny_llama, input_ids):
    original = tiny_llama.lm_head.weight.detach().clone()
    add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert "lm_head.modules_to_save.default.weight" in trainable
    assert "lm_head.original_module.weight" not in trainable
    with torch.no_grad():
        tiny_llama.lm_head.modules_to_save["default"].weight.add_(1.0)
    changed = tiny_llama(input_ids).logits
    with lorakit.disabled(tiny_llama):
        assert torch.equal(tiny_llama.lm_head.original_module.weight, original)
        assert not torch.allclose(tiny_llama(input_ids).logits, changed)


def test_several_adapters_lifecycle(tiny_llama, input_ids):
    with torch.no_grad():
        base = tiny_llama(input_ids).logits
    add_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False), "a")
    add_adapter(tiny_llama, LoraConfig(r=2, target_modules=["q_proj", "up_proj"], init_lora_weights=False), "b",
                activate=False)
    assert lorakit.inject.active_adapters(tiny_llama) == ["a"]
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)  # only the active adapter trains
    set_active(tiny_llama, ["a", "b"])
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert any(".b." in n for n in trainable)
    with torch.no_grad():
        both = tiny_llama(input_ids).logits
    assert not torch.allclose(both, base)
    delete_adapter(tiny_llama, "a")
    delete_adapter(tiny_llama, "b")
    assert _adapted(tiny_llama) == [] and not list(adapter_layers(tiny_llama))
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids).logits, base)
    with pytest.raises(LorakitError, match="no adapter named 'a'"):
        set_active(tiny_llama, "a")


def test_adapter_names_are_checked(tiny_llama):
    for bad in ["", "a.b", "../x", "x" * 65]:
        with pytest.raises(LorakitError, match="not allowed"):
            add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"]), bad)
    add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"]), "ok")
    with pytest.raises(LorakitError, match="already exists"):
        add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"]), "ok")


def test_trainable_parameter_count(tiny_llama):
    add_adapter(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable, total = trainable_parameters(tiny_llama)
    # q: A 4×32 + B 32×4; v: A 4×32 + B 16×4 (2 kv heads × 8), in 2 layers
    assert trainable == 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert total == sum(p.numel() for p in make_tiny("llama").parameters()) + trainable


def test_bias_modes(tmp_path):
    model = make_tiny("qwen2")  # q/k/v carry biases
    add_adapter(model, LoraConfig(target_modules=["q_proj"], bias="lora_only"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"model.layers.0.self_attn.q_proj.base_layer.bias",
                         "model.layers.1.self_attn.q_proj.base_layer.bias"}
    model = make_tiny("qwen2")
    add_adapter(model, LoraConfig(target_modules=["q_proj"], bias="all"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert len(trainable) == 6 and all(n.endswith("bias") for n in trainable)


def test_one_switch_for_every_adapter_nested_blocks_and_adapters_added_while_off(tiny_llama, input_ids):
    with torch.no_grad():
        base = tiny_llama(input_ids).logits
        add_adapter(tiny_llama, LoraConfig(target_modules=["q_proj"], init_lora_weights=False), "a")
        adapted = tiny_llama(input_ids).logits
        assert not torch.allclose(adapted, base)
        with lorakit.disabled(tiny_llama):
            with lorakit.disabled(tiny_llama):  # an inner block must not switch the outer one back on
                pass
            assert not lorakit.inject.is_enabled(tiny_llama)
            torch.testing.assert_close(tiny_llama(input_ids).logits, base, rtol=0, atol=0)
        assert lorakit.inject.is_enabled(tiny_llama)
        torch.testing.assert_close(tiny_llama(input_ids).logits, adapted, rtol=0, atol=0)

        lorakit.set_enabled(tiny_llama, False)
        add_adapter(tiny_llama, LoraConfig(target_modules=["v_proj", "up_proj"], init_lora_weights=False), "b")
        torch.testing.assert_close(tiny_llama(input_ids).logits, base, rtol=0, atol=0)  # b follows the switch
        with lorakit.disabled(tiny_llama):
            pass
        assert not lorakit.inject.is_enabled(tiny_llama)  # a block on a model already off leaves it off
        lorakit.enable(tiny_llama)  # the PEFT-style names are the same switch
        assert not torch.allclose(tiny_llama(input_ids).logits, base)
        lorakit.disable(tiny_llama)
        assert not lorakit.inject.is_enabled(tiny_llama)
        torch.testing.assert_close(tiny_llama(input_ids).logits, base, rtol=0, atol=0)
