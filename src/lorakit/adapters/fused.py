"""The fused LoRA linear: ``y = x Wᵀ + b + s · B A dropout(x)`` as one autograd op.

Forward, with ``m`` the dropout keep-mask, ``q = 1/(1-p)`` (:func:`keep_scale`) and W frozen::

    h = q · (x ⊙ m) Aᵀ          # (N, r): the rank-r intermediate, saved
    y = x Wᵀ + b + h (s·B)ᵀ      # scaling folded into the small (out, r) matrix, added in place

Backward, from ``g = dy`` (N, out)::

    dB = s · gᵀ h                # (out, r)
    dh = s · g B                 # (N, r)
    dA = q · dhᵀ (x ⊙ m)         # (r, in); x ⊙ m is recomputed, never kept
    dx = g W + q · (dh A) ⊙ m    # the LoRA part added in place into the base gradient
    db = Σ_tokens g              # only when the base bias is trained

Against the plain path (``nn.Dropout`` → ``lora_A`` → ``lora_B`` → ``× s`` → ``+``), it saves for
backward only what backward needs: ``x`` (which the layer's neighbours usually keep anyway: q, k
and v share it), what dropout removed, and ``h``; the plain path keeps a full copy of the
dropped-out input per adapted layer. The output and input gradient take no extra full-size
temporaries (``addmm_``, in-place ``add_``). Without dropout (p = 0 or eval mode) there is no
dropout work at all.

What dropout removed (:func:`draw_dropped`) is kept as the sorted flat positions of the dropped
elements for LoRA's usual p ≤ 0.25 (int64: 0.4 bytes per element of x at p = 0.05), and as a
byte keep-mask above that. With positions no full-size work is spent on dropout: ``x ⊙ m`` is x
itself with those elements set to 0 for the one matmul that reads it and put back right after
(:func:`with_dropped_input`), and ``(dh A) ⊙ m`` is ``dh A`` added in place with the base
gradient put back where x was dropped. :func:`dropout_mask` draws the same keep-mask from the same
seed, so a test can replay it through :func:`reference`, the plain-PyTorch version of the same
math.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorakit.adapters.layout import matmul, out_in

_LEVELS = 1 << 16  # above _SPARSE_MAX, dropout probabilities are resolved to 1/65536
_SPARSE_MAX = 0.25  # up to this drop probability, the dropped positions are drawn directly


def draw_dropped(x: torch.Tensor, p: float) -> torch.Tensor:
    """What dropout of probability ``p`` removes from ``x``, in the form the fused ops use.

    For ``p ≤ 0.25`` (LoRA's usual 0.05–0.1): the sorted flat positions of the dropped elements
    (int64), drawn from the geometric gaps between them (:func:`bernoulli_positions`): p·n random
    numbers instead of n, and no pass over x. Above that: the uint8 keep-mask (1 = kept), uniform
    16-bit integers, four from each random 64-bit word, against a threshold (``p`` rounded to a
    multiple of 1/65536); :func:`keep_scale` rescales by exactly the keep probability used, so the
    branch stays unbiased.
    """
    n = x.numel()
    if p <= _SPARSE_MAX:
        return bernoulli_positions(n, p, x.device)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = words.view(torch.int16)[:n].view(x.shape)  # each in [-32768, 32767]
    return (uniform >= round(p * _LEVELS) - _LEVELS // 2).view(torch.uint8)


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The keep-mask of :func:`draw_dropped` (uint8, shaped like ``x``, 1 where kept): the same
    mask from the same seed as the fused ops use, for tests and :func:`reference`."""
    return keep_mask(draw_dropped(x, p), x)


def keep_mask(dropped: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A uint8 keep-mask shaped like ``like`` from :func:`draw_dropped`'s result."""
    if dropped.dtype == torch.uint8:
        return dropped.view(like.shape)
    mask = torch.ones(like.numel(), dtype=torch.uint8, device=like.device)
    mask[dropped] = 0
    return mask.view(like.shape)


def zero_dropped_(t: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero, in place, the elements of the contiguous ``t`` that dropout removed; returns ``t``."""
    if dropped.dtype == torch.uint8:
        return t.mul_(dropped.view(t.shape))
    t.view(-1)[dropped] = 0
    return t


def with_dropped_input(x: torch.Tensor, dtype: torch.dtype, dropped: torch.Tensor | None,
                       compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``compute(x ⊙ m)`` with ``x ⊙ m`` in ``dtype`` (``x`` itself without dropout).

    With dropped positions and ``x`` already contiguous in ``dtype``, no copy of x is made: its
    dropped elements are set to 0 for the call and put back afterwards, exactly (through
    ``x.data``, so autograd's record of x is untouched; ops run one after another, so nothing
    reads x in between). Otherwise ``x ⊙ m`` is a masked copy.
    """
    if dropped is None:
        return compute(x.to(dtype))
    if dropped.dtype == torch.uint8 or x.dtype != dtype or not x.is_contiguous():
        return compute(zero_dropped_(x.to(dtype, copy=True, memory_format=torch.contiguous_format), dropped))
    flat = x.data.view(-1)
    kept = flat[dropped]
    flat[dropped] = 0
    try:
        return compute(x.data)
    finally:
        flat[dropped] = kept


def keep_scale(p: float) -> float:
    """``1 / (1 − p)`` for the drop probability :func:`dropout_mask` really uses."""
    if p <= _SPARSE_MAX:
        return 1.0 / (1.0 - p)
    return _LEVELS / (_LEVELS - round(p * _LEVELS))


def bernoulli_positions(n: int, p: float, device: torch.device | str | None = None) -> torch.Tensor:
    """Sorted positions of the successes among ``n`` independent Bernoulli(``p``) trials (int64).

    The failures before each success are geometric, ``G = ⌊log U / log(1 − p)⌋`` with U uniform
    in (0, 1], so the positions are running sums of ``G + 1``. U is drawn in fp32: a gap is never
    longer than ``log 2⁻²⁴ / log(1 − p)`` trials (324 at p = 0.05), a tail of probability 2⁻²⁴.
    """
    log_q = math.log1p(-p)
    found, start = [], 0
    while start < n:
        expected = (n - start) * p
        gaps = torch.rand(int(expected + 6 * math.sqrt(expected) + 16), device=device)
        gaps = gaps.neg_().log1p_().div_(log_q).floor_().to(torch.int64).add_(1)  # G + 1
        positions = gaps.cumsum_(0).add_(start - 1)
        found.append(positions[: int(torch.searchsorted(positions, n))])  # sorted: cut, no boolean mask
        start = int(positions[-1]) + 1
    return torch.cat(found) if len(found) > 1 else found[0]


def branch_down(x: torch.Tensor, A: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``h = q · (x ⊙ m) Aᵀ`` (N, r) in A's dtype, and what dropout removed (None without dropout)."""
    dropped = draw_dropped(x, p) if p > 0 else None
    h = with_dropped_input(x, A.dtype, dropped, lambda xm: xm @ A.T)
    if dropped is not None:
        h.mul_(keep_scale(p))
    return h, dropped


def add_branch_up(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> None:
    """``y += s · h Bᵀ`` in place; an fp32 branch over a half-precision ``y`` is cast once, at the end."""
    if y.dtype == h.dtype:
        y.addmm_(h, B.T, alpha=s)
    else:
        y.add_((h @ B.T).mul_(s).to(y.dtype))


def branch_grads(ga: torch.Tensor, x: torch.Tensor, dropped: torch.Tensor | None, h: torch.Tensor,
                 A: torch.Tensor, B: torch.Tensor, s: float, p: float, need_a: bool, need_b: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(dA, dB, dh)`` of the branch from ``ga``, the gradient of its output in A's dtype.

    ``dh`` carries ``s`` and the dropout scale ``q``, ready for :func:`add_branch_input_grad`;
    ``x ⊙ m`` is recomputed here, never kept.
    """
    dB = (ga.T @ h).mul_(s) if need_b else None  # (out, r)
    dh = (ga @ B).mul_(s * keep_scale(p) if dropped is not None else s)  # (N, r)
    dA = with_dropped_input(x, A.dtype, dropped, lambda xm: dh.T @ xm) if need_a else None  # (r, in)
    return dA, dB, dh


def branch_input_grad(dh: torch.Tensor, A: torch.Tensor, dropped: torch.Tensor | None) -> torch.Tensor:
    """The branch's part of the input gradient, ``(dh A) ⊙ m`` (N, in), in A's dtype."""
    grad = dh @ A
    return zero_dropped_(grad, dropped) if dropped is not None else grad


def add_branch_input_grad(dx: torch.Tensor, dh: torch.Tensor, A: torch.Tensor, dropped: torch.Tensor | None) -> None:
    """``dx += (dh A) ⊙ m`` in place.

    With dropped positions and matching dtypes: one ``addmm_`` over all of ``dx``, then the
    dropped elements get back the value they had (no full-size temporary, no pass with a mask).
    """
    if dx.dtype != dh.dtype or (dropped is not None and dropped.dtype == torch.uint8):
        dx.add_(branch_input_grad(dh, A, dropped).to(dx.dtype))
        return
    flat = dx.view(-1) if dropped is not None else None
    kept = flat[dropped] if flat is not None else None  # dx at the dropped elements: the base part only
    dx.addmm_(dh, A)
    if flat is not None:
        flat[dropped] = kept


class LoraLinearFn(torch.autograd.Function):
    """Autograd of the fused layer; see the module docstring for the math.

    Inputs: ``x`` (N, in); ``weight`` in the base layout (out, in), or (in, out) when
    ``fan_in_fan_out``; ``bias`` (out,) or None; ``A`` (r, in); ``B`` (out, r); ``s``; dropout
    ``p`` (0: none). ``x``, ``weight`` and ``bias`` share a dtype; ``A``/``B`` may be wider (fp32
    adapters over a bf16 base): the rank-r path then runs in their dtype, as in the plain path.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, s: float, p: float, fan_in_fan_out: bool, weight_fn=None):
        # weight_fn: a frozen weight stored otherwise (NF4): called for a transient (out, in) copy in
        # forward and again in backward, never kept.
        ctx.weight_fn = weight_fn
        if weight_fn is not None:
            weight = weight_fn()
        wt = out_in(weight, fan_in_fan_out).T  # (in, out) view, no copy
        y = x @ wt if bias is None else torch.addmm(bias, x, wt)  # (N, out)
        h, dropped = branch_down(x, A, p)
        add_branch_up(y, h, B, s)
        ctx.save_for_backward(x, dropped, h, None if weight_fn is not None else weight, A, B)
        ctx.s, ctx.p, ctx.fan_in_fan_out = s, p, fan_in_fan_out
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        return y

    @staticmethod
    def backward(ctx, g):
        x, dropped, h, weight, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        dA, dB, dh = branch_grads(g.to(A.dtype), x, dropped, h, A, B, ctx.s, ctx.p, need[3], need[4])
        dx = None
        if need[0]:
            if ctx.weight_fn is not None:
                weight = ctx.weight_fn()
            dx = g @ out_in(weight, ctx.fan_in_fan_out)  # (N, in)
            add_branch_input_grad(dx, dh, A, dropped)  # the LoRA part added in place
        db = g.sum(0) if ctx.bias_grad else None
        return dx, None, db, dA, dB, None, None, None, None


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
              s: float, mask: torch.Tensor | None, p: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The same layer in plain PyTorch ops (autograd by PyTorch), with a given keep-mask."""
    base = matmul(x, weight, fan_in_fan_out)
    if bias is not None:
        base = base + bias
    xa = x.to(A.dtype)
    if mask is not None:
        xa = xa * mask * keep_scale(p)
    return base + ((xa @ A.T) @ B.T * s).to(base.dtype)
