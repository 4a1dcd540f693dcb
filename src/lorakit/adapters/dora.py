"""DoRA: weight-decomposed LoRA (Liu et al. 2024, "DoRA", §4), PEFT-compatible.

::

    W' = m ⊙ (W + s·B A) / n,    n = ‖W + s·B A‖_row  (one norm per output feature, detached)
    y  = c ⊙ (W x + s·B A x) + b,   c = m / n

``m`` is ``lora_magnitude_vector`` (out,), initialised to ``n`` so a fresh adapter changes
nothing. What is notable here, against PEFT's implementation:

- ``n`` is computed without the (out × in) temporary ``W + s·B A`` (REFERENCE.md "DoRA")::

      n² = ‖W‖²_row + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)

  with ``‖W‖²_row`` cached while W is unchanged (keyed by the tensor's version counter).
- The base output ``W x`` is computed once and reused (PEFT recomputes it on the dropped-out
  input when dropout is on). Dropout therefore acts on the low-rank path only, as in LoRA.
- :class:`_Rescale` applies ``c ⊙ u`` and saves its own *output* rather than ``u``: the backward
  recovers ``u = out / c``. Where a later op keeps the output anyway, DoRA adds no activation
  memory for it. Rows with ``|c|`` near zero fall back to saving ``u``.
- Works over a 4-bit base (QDoRA): the base matmul and ``W`` come from
  :mod:`lorakit.adapters.quant`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.adapters.lora import LoraLinear

_TINY = 1e-4  # |c| below this: save u itself, dividing by c would not be exact


def row_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """``‖W + s·B A‖`` per output feature, fp32, detached — without forming ``W + s·B A``."""
    with torch.no_grad():
        weight = _out_in(layer, layer.dense_weight())  # (out, in) fp32
        A = layer.lora_A[name].weight.float()  # (r, in)
        B = layer.lora_B[name].weight.float()  # (out, r)
        s = layer.scaling[name]
        cross = (B * (weight @ A.T)).sum(dim=1)  # rowsum(B ⊙ W Aᵀ): (out,)
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # rowsum(B (A Aᵀ) ⊙ B): (out,)
        norm_sq = _weight_norm_sq(layer, weight) + 2 * s * cross + s * s * quad
        return norm_sq.clamp_min(0).sqrt()


def _weight_norm_sq(layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    # ‖W‖²_row of a frozen W, recomputed only when the stored tensor changes (merge, load).
    stored = layer.base_layer.weight
    key = (stored.data_ptr(), stored._version, tuple(stored.shape))
    cache = layer.__dict__.get("_dora_norm_cache")
    if cache is None or cache[0] != key:
        cache = (key, weight.pow(2).sum(dim=1))
        layer.__dict__["_dora_norm_cache"] = cache
    return cache[1]


def _out_in(layer: LoraLinear, weight: torch.Tensor) -> torch.Tensor:
    return weight.T if layer.fan_in_fan_out else weight


class _Rescale(torch.autograd.Function):
    """``out = c ⊙ u`` with ``u = W x + lora``, ``c = m / n`` (n constant).

    Backward: ``du = dy ⊙ c`` (to both W x and the LoRA branch); ``dm = Σ_tokens dy ⊙ u / n``.
    """

    @staticmethod
    def forward(ctx, wx: torch.Tensor, lora: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor):
        scale = (magnitude / norm).to(wx.dtype)  # (out,)
        u = wx + lora
        out = u * scale
        ctx.keep_u = bool((scale.abs() < _TINY).any())
        ctx.save_for_backward(u if ctx.keep_u else out, scale, norm)
        ctx.magnitude_dtype = magnitude.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved, scale, norm = ctx.saved_tensors
        u = saved if ctx.keep_u else saved / scale
        grad_u = grad_out * scale
        grad_m = (grad_out * u).reshape(-1, u.shape[-1]).sum(dim=0).to(ctx.magnitude_dtype) / norm
        return grad_u, grad_u, grad_m, None


def forward(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with DoRA adapter ``name``: ``c ⊙ (W x + s·B A dropout(x)) + b``."""
    wx = layer.base_forward(x, with_bias=False)  # (…, out), computed once
    lora = layer.lora_branch(name, x).to(wx.dtype)
    magnitude = layer.lora_magnitude_vector[name]
    out = _Rescale.apply(wx, lora, magnitude, row_norm(layer, name).to(magnitude.device))
    bias = getattr(layer.base_layer, "bias", None)
    return out if bias is None else out + bias.to(out.dtype)


def merged_weight(layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
    """``W' = c ⊙ (W + ΔW)`` in the base layout; remembers ``c`` so unmerging is exact."""
    out_in = _out_in(layer, weight) + _out_in(layer, layer.delta_weight(name))
    scale = layer.lora_magnitude_vector[name].detach().float() / out_in.norm(dim=1)
    layer.__dict__.setdefault("_dora_merge_scale", {})[name] = scale
    return _out_in(layer, out_in * scale[:, None])


def unmerged_weight(layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
    """``W = W' / c − ΔW`` with the ``c`` recorded when merging."""
    scale = layer.__dict__["_dora_merge_scale"].pop(name)
    out_in = _out_in(layer, weight) / scale[:, None] - _out_in(layer, layer.delta_weight(name))
    return _out_in(layer, out_in)
