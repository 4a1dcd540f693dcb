"""DoRA: weight-decomposed LoRA (Liu et al. 2024, "DoRA", §4), PEFT-compatible.

::

    W' = m ⊙ (W + s·B A) / n,    n = ‖W + s·B A‖_row  (one norm per output feature, detached)
    y  = c ⊙ (W x + s·B A x) + b,   c = m / n

``m`` is ``lora_magnitude_vector`` (out,), initialised to ``n`` so a fresh adapter changes
nothing. What is notable here, against PEFT's implementation:

- ``n`` is computed without the (out × in) temporary ``W + s·B A`` (REFERENCE.md "DoRA")::

      n² = ‖W‖²_row + 2s·rowsum(B ⊙ (W Aᵀ)) + s²·rowsum((B (A Aᵀ)) ⊙ B)

  with ``‖W‖²_row`` cached while W is unchanged (keyed by the tensor's version counter).
- The whole layer (base product, dropout, low-rank path, rescale) is one autograd op,
  :class:`_DoraLinear`. It saves the input ``x`` (one tensor for q, k and v, which read the same
  input), what dropout removed (positions, 0.4 bytes per element at p = 0.05), the rank-r ``h`` and its *output* ``c ⊙ u`` for the
  magnitude gradient (``u = out / c``); where a later op keeps that output anyway (SiLU, the MLP
  product), DoRA adds nothing for it. No dropped-out copy of ``x`` and no separate ``W x`` is
  kept: on ``benchmarks/dora_qlora.py dora`` the activations went from 383 to 305 MiB against
  the plain autograd graph (nn.Dropout → A → B, ``W x``, rescale). What is left over LoRA is the
  output of the layers whose output nothing else keeps (q, k, v, o, down in a Llama); dropping it
  exactly would mean recomputing ``W x`` in backward, one more base matmul per such layer.
- Dropout acts on the low-rank path only, as in LoRA (PEFT recomputes the base on the dropped
  input). :func:`reference` is the same math in plain PyTorch ops, for tests.
- Works over a 4-bit base (QDoRA): the base matmul and ``W`` come from
  :mod:`lorakit.adapters.quant`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorakit.adapters.fused import (add_branch_input_grad, add_branch_up, branch_down, branch_grads,
                                    branch_input_grad, keep_scale)

if TYPE_CHECKING:
    from lorakit.adapters.lora import LoraLinear

_TINY = 1e-4  # |c| below this: save u itself, dividing by c would not be exact


def row_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """``‖W + s·B A‖`` per output feature, fp32, detached — without forming ``W + s·B A``."""
    with torch.no_grad():
        weight = _out_in(layer, layer.dense_weight())  # (out, in) fp32
        A = layer.lora_A[name].weight.float()  # (r, in)
        B = layer.lora_B[name].weight.float()  # (out, r)
        return norm_of(weight, A, B, layer.scaling[name], _weight_norm_sq(layer, weight))


def norm_of(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
            weight_norm_sq: torch.Tensor | None = None) -> torch.Tensor:
    """``‖W + s·B A‖`` per output feature from tensors (fp32, no (out × in) temporary).

    Args:
        weight: W as (out, in).
        A: (r, in). B: (out, r). scaling: s.
        weight_norm_sq: ``‖W‖²_row`` if already known.

    Returns:
        (out,) fp32.
    """
    with torch.no_grad():
        weight, A, B = weight.float(), A.float().to(weight.device), B.float().to(weight.device)
        if weight_norm_sq is None:
            weight_norm_sq = weight.pow(2).sum(dim=1)
        cross = (B * (weight @ A.T)).sum(dim=1)  # rowsum(B ⊙ W Aᵀ): (out,)
        quad = ((B @ (A @ A.T)) * B).sum(dim=1)  # rowsum(B (A Aᵀ) ⊙ B): (out,)
        return (weight_norm_sq + 2 * scaling * cross + scaling * scaling * quad).clamp_min(0).sqrt()


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


class _DoraLinear(torch.autograd.Function):
    """The DoRA layer without its bias, as one autograd op. With ``q = 1/(1-p)`` (:func:`keep_scale`)
    and the keep-mask ``k``::

        h   = q · (x ⊙ k) Aᵀ                            (N, r): the rank-r intermediate, saved
        u   = x Wᵀ + s · h Bᵀ
        out = c ⊙ u,   c = m / n                         (n constant)

    Backward, from ``g = d out`` (N, out)::

        gu = g ⊙ c                                       the gradient of u
        dm = Σ_tokens g ⊙ u / n  = Σ_tokens (g ⊙ out) / (c n)
        dB = s · guᵀ h,   dh = s · gu B,   dA = q · dhᵀ (x ⊙ k)
        dx = gu W + q · (dh A) ⊙ k

    Saved: ``x`` (one tensor for the sibling layers that read it: q, k, v), what dropout removed
    (:func:`~lorakit.adapters.fused.draw_dropped`), ``h`` and ``out`` (which a later op often keeps
    anyway: SiLU, the MLP product, so it costs nothing there). ``x ⊙ k`` is recomputed in backward, never kept. If some ``|c|`` is near
    zero, ``u`` is saved instead of ``out`` (dividing by ``c`` would not be exact).

    ``wx`` None: the op computes ``x Wᵀ`` from ``weight`` ((out, in); (in, out) when
    ``fan_in_fan_out``). ``wx`` given (a 4-bit base, or a base weight that trains): the base
    product comes with its own autograd and the op returns its gradient ``gu``.
    """

    @staticmethod
    def forward(ctx, x, wx, weight, A, B, magnitude, norm, s: float, p: float, fan_in_fan_out: bool):
        h, dropped = branch_down(x, A, p)  # (N, r)
        u = x @ (weight if fan_in_fan_out else weight.T) if wx is None else wx.clone()  # (N, out), ours
        add_branch_up(u, h, B, s)
        scale = (magnitude / norm).to(u.dtype)  # (out,)
        keep_u = bool((scale.abs() < _TINY).any())
        out = u * scale if keep_u else u.mul_(scale)
        need_x, need_a, need_b, need_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        ctx.save_for_backward(  # only what the wanted gradients need: W only for dx, x only for dA
            x if need_a else None, dropped if need_a or need_x else None, h if need_b else None,
            (u if keep_u else out) if need_m else None,
            weight if wx is None and need_x else None, A, B, scale, norm)
        ctx.s, ctx.p, ctx.fan_in_fan_out, ctx.keep_u = s, p, fan_in_fan_out, keep_u
        ctx.magnitude_dtype, ctx.base_outside = magnitude.dtype, wx is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, dropped, h, saved, weight, A, B, scale, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        gu = g * scale  # (N, out)
        dA, dB, dh = branch_grads(gu.to(A.dtype), x, dropped, h, A, B, ctx.s, ctx.p, need[3], need[4])
        dx = None
        if need[0]:
            if ctx.base_outside:  # the base product has its own autograd: the LoRA part only
                dx = branch_input_grad(dh, A, dropped).to(x.dtype)
            else:
                dx = gu @ (weight.T if ctx.fan_in_fan_out else weight)  # (N, in)
                add_branch_input_grad(dx, dh, A, dropped)  # the LoRA part added in place
        dm = None
        if need[5]:  # Σ g ⊙ u, or Σ g ⊙ out = c · Σ g ⊙ u; into gu's memory once gu is used up
            prod = torch.mul(g, saved) if ctx.base_outside else torch.mul(g, saved, out=gu)
            dm = prod.sum(dim=0)  # (out,)
            if not ctx.keep_u:
                dm = dm / scale
            dm = dm.to(ctx.magnitude_dtype) / norm
        return dx, gu if ctx.base_outside else None, None, dA, dB, dm, None, None, None, None


def forward(layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
    """The layer's output with DoRA adapter ``name``: ``c ⊙ (W x + s·B A dropout(x)) + b``."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    magnitude = layer.lora_magnitude_vector[name]
    norm = row_norm(layer, name).to(magnitude.device)
    p = layer.dropout_p(name)
    weight = layer.base_layer.weight
    outside = layer.quantized or weight.requires_grad  # the base product keeps its own autograd
    wx = layer.base_forward(x, with_bias=False) if outside else None
    device = x.device.type
    if torch.is_autocast_enabled(device):  # autocast would cast inside the op: cast once, here
        dtype = torch.get_autocast_dtype(device)
        x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
        weight = weight if outside else weight.to(dtype)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    with torch.autocast(device, enabled=False):
        out = _DoraLinear.apply(x2, None if wx is None else wx.reshape(-1, wx.shape[-1]),
                                None if outside else weight, A, B, magnitude, norm, layer.scaling[name], p,
                                layer.fan_in_fan_out)
    out = out.view(*x.shape[:-1], out.shape[-1])
    bias = getattr(layer.base_layer, "bias", None)
    return out if bias is None else out + bias.to(out.dtype)


def reference(layer: LoraLinear, name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`forward` in plain PyTorch ops (autograd by PyTorch), with a given dropout mask; for tests."""
    A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
    wx = layer.base_forward(x, with_bias=False)
    xa = x.to(A.dtype)
    if mask is not None:
        xa = xa * mask * keep_scale(layer.options[name].dropout)
    u = wx + ((xa @ A.T) @ B.T * layer.scaling[name]).to(wx.dtype)
    magnitude = layer.lora_magnitude_vector[name]
    out = u * (magnitude / row_norm(layer, name).to(magnitude.device)).to(u.dtype)
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
