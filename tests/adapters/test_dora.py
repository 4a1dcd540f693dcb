"""DoRA: equal to PEFT's in outputs and gradients, loads both ways, merged == unmerged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from peft_oracle import logits, peft_load

import lorakit
from lorakit import LoraConfig, LorakitError, add_adapter, load_adapter, save_adapter
from lorakit.adapters import dora, fused
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


# -- the fused DoRA op (dora._DoraLinear) against the plain-PyTorch reference -----------------------


def _dora_layer(base: torch.nn.Module, dropout: float, dtype: torch.dtype = torch.float32) -> LoraLinear:
    from lorakit.adapters.lora import AdapterOptions, wrap

    layer = wrap(base.to(dtype))
    layer.add("d", AdapterOptions(r=4, alpha=8, dropout=dropout, init=False, use_dora=True))  # B ≠ 0
    layer.set_active(["d"])
    with torch.no_grad():  # a trained-looking magnitude, not just the initial norm
        layer.lora_magnitude_vector["d"].mul_(1 + 0.1 * torch.randn(layer.out_features))
    layer.base_layer.requires_grad_(False)
    return layer.train()


def _dora_run(layer, x, forward, seed=7):
    """Output, input gradient and A, B, magnitude gradients of one forward/backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = forward(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return (y.detach(), x.grad, layer.lora_A["d"].weight.grad, layer.lora_B["d"].weight.grad,
            layer.lora_magnitude_vector["d"].grad)


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_op_equals_plain_reference(kind, dtype, dropout):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {"linear": lambda: torch.nn.Linear(16, 24), "linear-no-bias": lambda: torch.nn.Linear(16, 24, bias=False),
            "conv1d": lambda: Conv1D(24, 16)}[kind]()
    layer = _dora_layer(base, dropout, dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    got = _dora_run(layer, x, layer)

    def plain(x):  # the same mask from the same seed, drawn as the fused op draws it
        mask = fused.dropout_mask(x.reshape(-1, 16), dropout).reshape(x.shape) if dropout else None
        if mask is not None:
            assert 0.4 < mask.float().mean() < 0.95
        return dora.reference(layer, "d", x, mask)
    want = _dora_run(layer, x, plain)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("out", "x", "A", "B", "magnitude"), got, want):
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    assert got[1].dtype == dtype and got[2].dtype == got[4].dtype == torch.float32  # fp32 adapter over bf16


def test_fused_op_with_near_zero_magnitude_rows():
    """|c| ≈ 0 in some rows: the op keeps u rather than dividing the output by c."""
    torch.manual_seed(0)
    layer = _dora_layer(torch.nn.Linear(16, 24), dropout=0.0)
    with torch.no_grad():
        layer.lora_magnitude_vector["d"][:5] = 0.0
    x = torch.randn(2, 4, 16)
    got, want = _dora_run(layer, x, layer), _dora_run(layer, x, lambda x: dora.reference(layer, "d", x))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert got[4][:5].abs().sum() > 0  # the magnitude of a zeroed row still gets its gradient


def test_fused_op_keeps_input_dropped_positions_rank_r_and_output_only():
    """Saved for backward: x (shared by sibling layers), the dropped positions, h (N, r) and the
    output — no dropped-out copy of x, no mask, no separate W x."""
    torch.manual_seed(0)
    q, k = (_dora_layer(torch.nn.Linear(64, 48, bias=False), 0.1) for _ in range(2))
    x = torch.randn(2, 8, 64, requires_grad=True)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [q(x), k(x)]
    tensors = [t for t in saved.values() if not isinstance(t, torch.nn.Parameter)]
    big = [t for t in tensors if t.numel() >= 16 * 48]
    kinds = sorted((tuple(t.shape), str(t.dtype)) for t in big)
    assert kinds == sorted([((16, 64), "torch.float32")] + [((16, 48), "torch.float32")] * 2), kinds
    assert {t.untyped_storage().data_ptr() for t in big} >= {x.untyped_storage().data_ptr(),
                                                             outs[0].untyped_storage().data_ptr()}
    positions = [t for t in tensors if t.dtype == torch.int64]
    assert len(positions) == 2 and all(0 < t.numel() < 0.2 * 16 * 64 for t in positions)  # p = 0.1 of 1024


def test_fused_op_under_autocast_matches_reference():
    torch.manual_seed(0)
    layer = _dora_layer(torch.nn.Linear(16, 24), dropout=0.0)
    x = torch.randn(2, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _dora_run(layer, x, layer)
        want = _dora_run(layer, x, lambda x: dora.reference(layer, "d", x))
    assert got[0].dtype == torch.bfloat16
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


def test_fused_op_with_a_trainable_base_weight_gives_its_gradient():
    """A base weight that trains (not lorakit's default): the base product keeps its own autograd."""
    torch.manual_seed(0)
    layer = _dora_layer(torch.nn.Linear(16, 24), dropout=0.0)
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 4, 16)
    got = _dora_run(layer, x, layer) + (layer.base_layer.weight.grad.clone(),)
    layer.base_layer.weight.grad = None
    want = _dora_run(layer, x, lambda x: dora.reference(layer, "d", x)) + (layer.base_layer.weight.grad,)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
