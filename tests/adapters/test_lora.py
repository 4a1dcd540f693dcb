"""The LoRA layers' math: identity at init, disable, merge/unmerge, gradients, dtypes."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters.lora import AdapterOptions, LoraEmbedding, LoraLinear, wrap
from lorakit.errors import LorakitError


def _random(layer, name="default", scale=0.1):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for attr in layer.adapter_attrs:
            container = getattr(layer, attr)
            if name in container:
                for p in (container[name].parameters() if isinstance(container[name], nn.Module)
                          else [container[name]]):
                    p.copy_(torch.randn(p.shape, generator=generator) * scale)


@pytest.fixture
def linear():
    torch.manual_seed(0)
    return nn.Linear(16, 24)


def test_fresh_adapter_is_identity(linear):
    x = torch.randn(3, 5, 16)
    expected = linear(x)
    layer = wrap(linear)
    layer.add("default", AdapterOptions(r=4, alpha=8))
    layer.set_active(["default"])
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    bound = 1 / math.sqrt(16)  # kaiming-uniform with a=√5 is U(±1/√in)
    assert layer.lora_A["default"].weight.abs().max() <= bound


@pytest.mark.parametrize("rslora,expected", [(False, 8 / 4), (True, 8 / 2)])
def test_output_is_base_plus_scaled_update(linear, rslora, expected):
    layer = wrap(linear)
    layer.add("default", AdapterOptions(r=4, alpha=8, use_rslora=rslora))
    layer.set_active(["default"])
    _random(layer)
    assert layer.scaling["default"] == expected
    x = torch.randn(7, 16)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    manual = x @ linear.weight.T + linear.bias + expected * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), manual, rtol=1e-6, atol=1e-6)


def test_disabled_and_inactive_equal_base(linear):
    x = torch.randn(4, 16)
    expected = linear(x)
    layer = wrap(linear)
    layer.add("a", AdapterOptions(r=4, alpha=8))
    _random(layer, "a")
    layer.set_active(["a"])
    assert not torch.allclose(layer(x), expected)
    layer.disabled = True
    assert torch.equal(layer(x), expected)
    layer.disabled = False
    layer.set_active([])
    assert torch.equal(layer(x), expected)


def test_two_active_adapters_add_up(linear):
    x = torch.randn(4, 16)
    layer = wrap(linear)
    for name in ("a", "b"):
        layer.add(name, AdapterOptions(r=2 if name == "a" else 3, alpha=4))
        _random(layer, name, scale=0.2 if name == "a" else 0.3)
    base = linear(x)
    layer.set_active(["a"])
    only_a = layer(x) - base
    layer.set_active(["b"])
    only_b = layer(x) - base
    layer.set_active(["a", "b"])
    torch.testing.assert_close(layer(x), base + only_a + only_b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_merge_unmerge(kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(16, 24), torch.randn(3, 16)
    elif kind == "conv1d":
        base, x = Conv1D(24, 16), torch.randn(3, 16)  # nf=out, nx=in; weight (in, out)
    else:
        base, x = nn.Embedding(50, 12), torch.randint(0, 50, (3, 7))
    original = base.weight.detach().clone()
    layer = wrap(base)
    assert isinstance(layer, LoraEmbedding if kind == "embedding" else LoraLinear)
    layer.add("default", AdapterOptions(r=4, alpha=8, init=False))
    layer.set_active(["default"])
    _random(layer)
    unmerged = layer(x)
    delta = layer.delta_weight("default")
    assert delta.shape == base.weight.shape
    layer.merge()
    torch.testing.assert_close(base.weight, original + delta, rtol=0, atol=1e-6)  # W' = W + ΔW
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    merged_once = base.weight.detach().clone()
    layer.merge()  # merging twice changes nothing
    assert torch.equal(base.weight, merged_once)
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_refuses_nan_before_touching_weights(linear):
    layer = wrap(linear)
    layer.add("default", AdapterOptions(r=4, alpha=8))
    layer.set_active(["default"])
    with torch.no_grad():
        layer.lora_B["default"].weight[0, 0] = float("nan")
    before = linear.weight.detach().clone()
    with pytest.raises(LorakitError, match="NaN or inf"):
        layer.merge()
    assert torch.equal(linear.weight, before) and layer.merged == []


def test_lora_bias_merges_into_base_bias(linear):
    layer = wrap(linear)
    layer.add("default", AdapterOptions(r=4, alpha=8, lora_bias=True, init=False))
    layer.set_active(["default"])
    _random(layer)
    x = torch.randn(3, 16)
    expected = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    no_bias = wrap(nn.Linear(16, 24, bias=False))
    no_bias.add("default", AdapterOptions(r=4, alpha=8, lora_bias=True))
    no_bias.set_active(["default"])
    with pytest.raises(LorakitError, match="no bias"):
        no_bias.merge()


def test_dropout_acts_on_the_adapter_branch_only(linear):
    layer = wrap(linear)
    layer.add("default", AdapterOptions(r=4, alpha=8, dropout=0.5))
    layer.set_active(["default"])
    layer.train()
    x = torch.randn(64, 16)
    # B = 0: whatever dropout does to the branch, the output is the base output, untouched.
    assert torch.equal(layer(x), linear(x))
    _random(layer)
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(2)
    b = layer(x)
    assert not torch.allclose(a, b)  # training: the branch is stochastic
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_gaussian_init():
    layer = wrap(nn.Linear(512, 512))
    layer.add("default", AdapterOptions(r=8, alpha=8, init="gaussian"))
    A = layer.lora_A["default"].weight
    assert abs(A.std().item() - 1 / 8) < 0.01  # N(0, 1/r) as PEFT draws it (std 1/r)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapter_stays_fp32_on_a_half_precision_base(dtype):
    torch.manual_seed(0)
    base = nn.Linear(16, 24).to(dtype)
    layer = wrap(base)
    layer.add("default", AdapterOptions(r=4, alpha=8, init=False))
    layer.set_active(["default"])
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    x = torch.randn(3, 16, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_B["default"].weight.grad.dtype == torch.float32


def test_only_adapter_tensors_get_gradients_and_base_stays_bit_identical():
    from lorakit import LoraConfig, add_adapter

    model = make_tiny("llama").train()
    add_adapter(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1))
    base_before = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 96, (2, 12))
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        assert param.requires_grad == ("lora_" in name), name
    after = model.state_dict()
    for key, value in base_before.items():
        assert torch.equal(after[key], value), f"{key} changed"
    # …and the adapters did learn something.
    assert any(torch.count_nonzero(p) for n, p in model.named_parameters() if "lora_B" in n)


def test_wrap_refuses_other_modules():
    with pytest.raises(LorakitError, match="LayerNorm"):
        wrap(nn.LayerNorm(4))


@pytest.mark.parametrize("options, message", [
    (AdapterOptions(r=2, alpha=2, use_dora=True, lora_bias=True), "lora_bias cannot be combined with DoRA"),
    (AdapterOptions(r=2, alpha=2, init="bogus"), "unknown init_lora_weights"),
])
def test_a_refused_adapter_leaves_the_layer_as_it_was(options, message):
    torch.manual_seed(0)
    layer = wrap(nn.Linear(8, 6))
    layer.add("kept", AdapterOptions(r=2, alpha=4, init=False))
    layer.set_active(["kept"])
    x = torch.randn(3, 8)
    before, keys = layer(x), sorted(layer.state_dict())
    with pytest.raises(LorakitError, match=message):
        layer.add("new", options)
    assert layer.adapter_names == ["kept"] and sorted(layer.state_dict()) == keys
    assert torch.equal(layer(x), before)
    layer.add("new", AdapterOptions(r=2, alpha=2))  # the name is free again
    assert layer.adapter_names == ["kept", "new"]
