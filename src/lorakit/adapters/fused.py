"""The fused LoRA linear: ``y = x Wᵀ + b + s · B A dropout(x)`` as one autograd op.

Forward, with ``m`` the dropout keep-mask (uint8), ``q = 1/(1-p)`` (:func:`keep_scale`) and W frozen::

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
and v share it), the mask as one byte per element, and ``h``; the plain path keeps a full copy of
the dropped-out input per adapted layer. The output and input gradient take no extra full-size
temporaries (``addmm_``, in-place ``mul_``/``add_``). Without dropout (p = 0 or eval mode) there is no mask and
no dropout work at all. The dropout mask is drawn by :func:`dropout_mask`, so a test can draw the
same mask from the same seed.

:func:`reference` is the plain-PyTorch version of the same math, for tests.
"""

from __future__ import annotations

import math

import torch


_LEVELS = 1 << 16  # above _SPARSE_MAX, dropout probabilities are resolved to 1/65536
_SPARSE_MAX = 0.25  # up to this drop probability, the dropped positions are drawn directly


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Keep-mask of dropout probability ``p`` for ``x``: uint8, 1 where the element is kept, 0 where
    dropped (multiplying by a uint8 mask is about twice as fast on CPU as by a bool one).

    For ``p ≤ 0.25`` (LoRA's usual 0.05–0.1) only the dropped positions are drawn, from the
    geometric gaps between them (:func:`bernoulli_positions`): p·n random numbers instead of n,
    about 4× faster on CPU than one draw per element. Above that, uniform 16-bit integers, four from
    each random 64-bit word, against a threshold (``p`` rounded to a multiple of 1/65536);
    :func:`keep_scale` rescales by exactly the keep probability used, so the branch stays unbiased.
    """
    n = x.numel()
    if p <= _SPARSE_MAX:
        mask = torch.ones(n, dtype=torch.uint8, device=x.device)
        mask[bernoulli_positions(n, p, x.device)] = 0
        return mask.view(x.shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    uniform = words.view(torch.int16)[:n].view(x.shape)  # each in [-32768, 32767]
    return (uniform >= round(p * _LEVELS) - _LEVELS // 2).view(torch.uint8)


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
    """``h = q · (x ⊙ m) Aᵀ`` (N, r) in A's dtype, and the keep-mask ``m`` (None without dropout)."""
    xa = x.to(A.dtype)
    mask = dropout_mask(x, p) if p > 0 else None
    h = (xa * mask if mask is not None else xa) @ A.T
    if mask is not None:
        h.mul_(keep_scale(p))
    return h, mask


def add_branch_up(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, s: float) -> None:
    """``y += s · h Bᵀ`` in place; an fp32 branch over a half-precision ``y`` is cast once, at the end."""
    if y.dtype == h.dtype:
        y.addmm_(h, B.T, alpha=s)
    else:
        y.add_((h @ B.T).mul_(s).to(y.dtype))


def branch_grads(ga: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None, h: torch.Tensor, A: torch.Tensor,
                 B: torch.Tensor, s: float, p: float, need_a: bool, need_b: bool
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """``(dA, dB, dh)`` of the branch from ``ga``, the gradient of its output in A's dtype.

    ``dh`` carries ``s`` and the dropout scale ``q``, ready for :func:`add_branch_input_grad`;
    ``x ⊙ m`` is recomputed here, never kept.
    """
    dB = (ga.T @ h).mul_(s) if need_b else None  # (out, r)
    dh = (ga @ B).mul_(s * keep_scale(p) if mask is not None else s)  # (N, r)
    dA = None
    if need_a:
        xa = x.to(A.dtype)
        dA = dh.T @ (xa * mask if mask is not None else xa)  # (r, in)
    return dA, dB, dh


def branch_input_grad(dh: torch.Tensor, A: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The branch's part of the input gradient, ``(dh A) ⊙ m`` (N, in), in A's dtype."""
    grad = dh @ A
    return grad.mul_(mask) if mask is not None else grad


def add_branch_input_grad(dx: torch.Tensor, dh: torch.Tensor, A: torch.Tensor, mask: torch.Tensor | None) -> None:
    """``dx += (dh A) ⊙ m`` in place (one ``addmm_`` without dropout)."""
    if mask is None and dx.dtype == dh.dtype:
        dx.addmm_(dh, A)
    else:
        dx.add_(branch_input_grad(dh, A, mask).to(dx.dtype))


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
        wt = weight if fan_in_fan_out else weight.T  # (in, out) view, no copy
        y = x @ wt if bias is None else torch.addmm(bias, x, wt)  # (N, out)
        h, mask = branch_down(x, A, p)
        add_branch_up(y, h, B, s)
        ctx.save_for_backward(x, mask, h, None if weight_fn is not None else weight, A, B)
        ctx.s, ctx.p, ctx.fan_in_fan_out = s, p, fan_in_fan_out
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        return y

    @staticmethod
    def backward(ctx, g):
        x, mask, h, weight, A, B = ctx.saved_tensors
        need = ctx.needs_input_grad
        dA, dB, dh = branch_grads(g.to(A.dtype), x, mask, h, A, B, ctx.s, ctx.p, need[3], need[4])
        dx = None
        if need[0]:
            if ctx.weight_fn is not None:
                weight = ctx.weight_fn()
            dx = g @ (weight.T if ctx.fan_in_fan_out else weight)  # (N, in)
            add_branch_input_grad(dx, dh, A, mask)  # the LoRA part added in place
        db = g.sum(0) if ctx.bias_grad else None
        return dx, None, db, dA, dB, None, None, None, None


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor,
              s: float, mask: torch.Tensor | None, p: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """The same layer in plain PyTorch ops (autograd by PyTorch), with a given keep-mask."""
    base = x @ weight if fan_in_fan_out else torch.nn.functional.linear(x, weight)
    if bias is not None:
        base = base + bias
    xa = x.to(A.dtype)
    if mask is not None:
        xa = xa * mask * keep_scale(p)
    return base + ((xa @ A.T) @ B.T * s).to(base.dtype)
