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
- State: m is ``layer.lora_magnitude_vector[name]``, where PEFT keeps it (file key
  ``….lora_magnitude_vector``); :class:`DoraState` in ``layer.lora_dora[name]`` holds the ``c`` of
  a merged adapter (a buffer ``.to()`` moves, so unmerging is exact) and the ``‖W‖²_row`` cache. :data:`DORA` is the strategy object (:mod:`lorakit.adapters.variants`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lorakit.adapters.fused import (add_branch_input_grad, add_branch_up, branch_down, branch_grads,
                                    branch_input_grad, keep_scale)
from lorakit.adapters.layout import out_in
from lorakit.adapters.variants import Variant

if TYPE_CHECKING:
    from lorakit.adapters.lora import AdapterOptions, LoraLinear

_TINY = 1e-4  # |c| below this: save u itself, dividing by c would not be exact


class DoraState(nn.Module):
    """What one DoRA adapter keeps on one layer beside m.

    ``merge_scale`` is a (non-persistent) buffer, so ``.to()`` moves it with the merged weight.
    ``weight_norm_sq`` is a cache of the frozen W's row norms, keyed by the stored tensor: a moved
    or changed W has another key and recomputes it, so it is a plain attribute (not a buffer: it
    is not part of the model's memory that ``lorakit estimate`` counts as weights).
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("merge_scale", None, persistent=False)  # c = m / ‖W + ΔW‖_row while merged
        self.weight_norm_sq: torch.Tensor | None = None  # ‖W‖²_row of the frozen W
        self.weight_key: tuple | None = None  # the stored W that weight_norm_sq belongs to


class Dora(Variant):
    """DoRA as a :class:`~lorakit.adapters.variants.Variant`: it computes the whole layer."""

    rescales_base = True

    def create(self, layer: LoraLinear, name: str, options: AdapterOptions) -> None:
        layer.lora_magnitude_vector[name] = nn.Parameter(row_norm(layer, name))  # m = n: no change at init
        layer.lora_dora[name] = DoraState()

    def forward(self, layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
        return forward(layer, name, x)

    def merged_weight(self, layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W' = c ⊙ (W + ΔW)`` in the base layout; keeps ``c`` so unmerging is exact."""
        fan_in_fan_out, state = layer.fan_in_fan_out, layer.lora_dora[name]
        full = out_in(weight, fan_in_fan_out) + out_in(layer.delta_weight(name), fan_in_fan_out)  # (out, in)
        state.merge_scale = layer.lora_magnitude_vector[name].detach().float() / full.norm(dim=1)
        return out_in(full * state.merge_scale[:, None], fan_in_fan_out)

    def unmerged_weight(self, layer: LoraLinear, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``W = W' / c − ΔW`` with the ``c`` kept when merging."""
        fan_in_fan_out, state = layer.fan_in_fan_out, layer.lora_dora[name]
        scale, state.merge_scale = state.merge_scale, None
        full = out_in(weight, fan_in_fan_out) / scale[:, None] - out_in(layer.delta_weight(name), fan_in_fan_out)
        return out_in(full, fan_in_fan_out)


DORA = Dora()


def row_norm(layer: LoraLinear, name: str) -> torch.Tensor:
    """``‖W + s·B A‖`` per output feature, fp32, detached — without forming ``W + s·B A``."""
    with torch.no_grad():
        weight = out_in(layer.dense_weight(), layer.fan_in_fan_out)  # (out, in) fp32
        A = layer.lora_A[name].weight.float()  # (r, in)
        B = layer.lora_B[name].weight.float()  # (out, r)
        state = layer.lora_dora[name] if name in layer.lora_dora else None
        return norm_of(weight, A, B, layer.scaling[name], _weight_norm_sq(layer, weight, state))


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


def _weight_norm_sq(layer: LoraLinear, weight: torch.Tensor, state: DoraState | None) -> torch.Tensor:
    # ‖W‖²_row of a frozen W, recomputed only when the stored tensor changes (merge, load, .to()).
    if state is None:
        return weight.pow(2).sum(dim=1)
    stored = layer.base_layer.weight
    key = (stored.data_ptr(), stored._version, tuple(stored.shape))
    if state.weight_norm_sq is None or state.weight_key != key:
        state.weight_norm_sq, state.weight_key = weight.pow(2).sum(dim=1), key
    return state.weight_norm_sq


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
        u = x @ out_in(weight, fan_in_fan_out).T if wx is None else wx.clone()  # (N, out), ours
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
                dx = gu @ out_in(weight, ctx.fan_in_fan_out)  # (N, in)
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
