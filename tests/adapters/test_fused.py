"""The fused LoRA linear gives the plain path's outputs and gradients (with and without dropout)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.adapters import fused
from lorakit.adapters.lora import AdapterOptions, wrap


def _layer(base: nn.Module, dropout: float, dtype: torch.dtype = torch.float32, seed: int = 0):
    layer = wrap(base.to(dtype))
    layer.add("default", AdapterOptions(r=4, alpha=8, dropout=dropout, init=False))  # B ≠ 0
    layer.set_active(["default"])
    layer.requires_grad_(False)
    for p in layer.lora_A.parameters():
        p.requires_grad_(True)
    for p in layer.lora_B.parameters():
        p.requires_grad_(True)
    return layer.train()


def _run(layer, x, seed):
    """Output, input gradient and adapter gradients of one forward/backward."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(a, b):
        torch.testing.assert_close(got.float(), want.float(), **tol)


@pytest.mark.parametrize("kind", ["linear", "linear-no-bias", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_plain_without_dropout(kind, dtype):
    torch.manual_seed(0)
    base = {"linear": lambda: nn.Linear(16, 24), "linear-no-bias": lambda: nn.Linear(16, 24, bias=False),
            "conv1d": lambda: Conv1D(24, 16)}[kind]()
    layer = _layer(base, dropout=0.0, dtype=dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    got = _run(layer, x, seed=0)
    layer.fused = False
    want = _run(layer, x, seed=0)
    _close(got, want, dtype)
    if dtype == torch.float32:
        assert torch.equal(got[0], want[0]) or torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert got[2].dtype == torch.float32 and got[1].dtype == dtype  # fp32 adapters over a bf16 base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("p", [0.1, 0.3])  # dropped positions / a byte keep-mask
def test_fused_equals_plain_under_the_same_dropout_mask(dtype, fan_in_fan_out, p):
    torch.manual_seed(0)
    base = Conv1D(24, 16) if fan_in_fan_out else nn.Linear(16, 24)
    layer = _layer(base, dropout=p, dtype=dtype)
    x = torch.randn(4, 6, 16, dtype=dtype)
    got = _run(layer, x, seed=7)
    # The same mask from the same seed, through plain PyTorch ops (autograd by PyTorch).
    torch.manual_seed(7)
    mask = fused.dropout_mask(x.reshape(-1, 16), p).reshape(x.shape)
    assert 1 - p - 0.1 < mask.float().mean() < 1 - p + 0.1  # the share kept
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    A.grad = B.grad = None
    xr = x.detach().clone().requires_grad_(True)
    y = fused.reference(xr, base.weight, base.bias, A, B, layer.scaling["default"], mask, p, fan_in_fan_out)
    (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    _close(got, (y.detach(), xr.grad, A.grad, B.grad), dtype)


def test_dropout_mask_is_used_in_training_only_and_fresh_each_call():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24), dropout=0.5)
    x = torch.randn(32, 16)
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), fused.reference(x, layer.base_layer.weight, layer.base_layer.bias,
                                                         layer.lora_A["default"].weight,
                                                         layer.lora_B["default"].weight, 2.0, None, 0.0))


def test_fused_saves_less_for_backward_than_the_plain_path():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(256, 256), dropout=0.1)
    x = torch.randn(64, 256, requires_grad=True)

    def saved_bytes() -> int:
        seen: dict[int, int] = {}

        def pack(t):
            if not isinstance(t, nn.Parameter):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        return sum(seen.values())

    fused_bytes = saved_bytes()
    layer.fused = False
    plain_bytes = saved_bytes()
    # plain: x, the dropped-out copy (fp32) and the mask; fused: x, a 1-byte mask and h.
    assert fused_bytes < 0.6 * plain_bytes, (fused_bytes, plain_bytes)


class _Replay(nn.Module):
    """Dropout that replays recorded draws of :func:`fused.draw_dropped`, in order (the plain path
    under the fused path's masks)."""

    def __init__(self, masks: list[torch.Tensor], p: float) -> None:
        super().__init__()
        self.masks, self.p = masks, p

    def forward(self, x):
        return x * fused.keep_mask(self.masks.pop(0), x) * fused.keep_scale(self.p)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_model_step_equals_plain_path(dropout, monkeypatch):
    from lorakit import LoraConfig, add_adapter
    from lorakit.adapters.lora import LoraLinear

    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    masks: list[torch.Tensor] = []
    draw = fused.draw_dropped
    monkeypatch.setattr(fused, "draw_dropped", lambda x, p: masks.append(draw(x, p)) or masks[-1])
    results = []
    for use_fused in (True, False):
        model = make_tiny("qwen2").train()  # q/k/v biases
        add_adapter(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=dropout, init_lora_weights=False))
        layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
        for m in layers:
            m.fused = use_fused
            if not use_fused and dropout:
                m.lora_dropout["default"] = _Replay(masks, dropout)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert not masks  # every recorded mask was replayed
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name in results[0][1]:
        torch.testing.assert_close(results[0][1][name], results[1][1][name], rtol=1e-5, atol=1e-5, msg=name)


def test_autocast_runs_the_branch_in_the_autocast_dtype():
    torch.manual_seed(0)
    layer = _layer(nn.Linear(16, 24), dropout=0.0)
    x = torch.randn(5, 16)
    outs = []
    for use_fused in (True, False):
        layer.fused = use_fused
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs.append(_run(layer, x, seed=0))
    assert outs[0][0].dtype == outs[1][0].dtype == torch.bfloat16
    assert outs[0][2].dtype == torch.float32
    _close(outs[0], outs[1], torch.bfloat16)


def test_several_adapters_and_lora_bias_take_the_plain_path():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(16, 24))
    layer.add("a", AdapterOptions(r=4, alpha=8, init=False))
    assert not layer._can_fuse("a", torch.randn(3, 16))  # a trained base weight: plain path
    layer.base_layer.requires_grad_(False)
    layer.add("b", AdapterOptions(r=2, alpha=2, init=False, lora_bias=True))
    x = torch.randn(3, 16)
    with torch.no_grad():
        layer.set_active(["b"])
        assert not layer._can_fuse("b", x)
        layer.set_active(["a", "b"])
        both = layer(x)
        layer.set_active(["a"])
        assert layer._can_fuse("a", x)
        a = layer(x)
        layer.set_active(["b"])
        b = layer(x)
    torch.testing.assert_close(both, a + b - layer.base_layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_dropout_mask_keeps_the_right_share_unbiased(p):
    torch.manual_seed(0)
    mask = fused.dropout_mask(torch.empty(1000, 1000), p)
    assert mask.dtype == torch.uint8 and mask.shape == (1000, 1000) and set(mask.unique().tolist()) == {0, 1}
    assert abs(mask.float().mean().item() - (1 - p)) < 2e-3  # 1 = kept
    assert abs(1 / fused.keep_scale(p) - (1 - p)) < 1e-5  # p is resolved to 1/65536
    assert not torch.equal(mask, fused.dropout_mask(torch.empty(1000, 1000), p))  # fresh every call
    torch.manual_seed(0)
    assert torch.equal(mask, fused.dropout_mask(torch.empty(1000, 1000), p))  # seeded: the same


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_over_an_nf4_base_equals_plain_path(dropout, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from lorakit.adapters.quant import quantize_linear

    torch.manual_seed(0)
    layer = _layer(quantize_linear(nn.Linear(64, 48)), dropout=dropout)
    assert layer.quantized and layer._can_fuse("default", torch.randn(2, 64))
    x = torch.randn(3, 5, 64)
    masks: list[torch.Tensor] = []
    draw = fused.draw_dropped
    monkeypatch.setattr(fused, "draw_dropped", lambda t, p: masks.append(draw(t, p)) or masks[-1])
    got = _run(layer, x, seed=0)
    layer.fused = False
    if dropout:
        layer.lora_dropout["default"] = _Replay(masks, dropout)
    want = _run(layer, x, seed=0)
    _close(got, want, torch.float32)
    assert got[2].abs().sum() > 0 and got[1].abs().sum() > 0


@pytest.mark.parametrize("p", [0.05, 0.25])
def test_dropped_positions_are_a_bernoulli_process(p):
    torch.manual_seed(0)
    n = 400_000
    pos = fused.bernoulli_positions(n, p)
    assert pos.dtype == torch.int64 and bool((pos[1:] > pos[:-1]).all()) and 0 <= int(pos[0]) and int(pos[-1]) < n
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(len(pos) - n * p) < 4 * sigma  # the count is Binomial(n, p)
    halves = torch.bincount((pos >= n // 2).long(), minlength=2)
    assert abs(int(halves[0]) - int(halves[1])) < 4 * (2 * sigma)  # no drift along the tensor
    gaps = (pos[1:] - pos[:-1] - 1).double()  # failures between successes: geometric, mean (1-p)/p
    assert abs(gaps.mean().item() - (1 - p) / p) < 4 * ((1 - p) ** 0.5 / p) / len(gaps) ** 0.5
    assert abs((gaps == 0).double().mean().item() - p) < 0.01  # P(G = 0) = p
    for tiny in (1, 3, 17):  # short tensors: every position in range, sometimes none
        assert all(0 <= int(i) < tiny for i in fused.bernoulli_positions(tiny, p))


def test_both_mask_regimes_keep_the_right_share():
    torch.manual_seed(0)
    for p in (0.25, 0.2500001, 0.6):  # either side of the switch to 16-bit uniforms
        mask = fused.dropout_mask(torch.empty(500, 1000), p)
        assert abs(mask.float().mean().item() - (1 - p)) < 3e-3
        assert fused.keep_scale(p) * (1 - p) == pytest.approx(1.0, abs=2e-5)


def test_masked_input_leaves_x_and_its_autograd_record_untouched():
    """x ⊙ m is x with its dropped elements zeroed for one matmul and put back: x is bit-identical
    afterwards, and other ops that saved x still pass autograd's version check."""
    torch.manual_seed(0)
    q, k = _layer(nn.Linear(16, 24), dropout=0.1), _layer(nn.Linear(16, 24), dropout=0.1)
    x = torch.randn(40, 16, requires_grad=True)
    h = x * 1.0  # a non-leaf, as a norm's output would be
    before = h.detach().clone()
    other = (h * h).sum()  # saves h for its backward
    out = q(h).sum() + k(h).sum() + other
    assert torch.equal(h.detach(), before) and h._version == 0
    out.backward()
    assert torch.equal(h.detach(), before) and x.grad is not None and torch.isfinite(x.grad).all()
