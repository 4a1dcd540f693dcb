"""LoRA on mixture-of-experts weights, computed on the tokens routed to each expert only.

transformers 5 stores an MoE layer's experts as one module with 3-D parameters (Qwen3-MoE:
``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); gpt-oss stores them transposed, (E, in, out),
with biases) and dispatches their forward through its experts interface
(``transformers.integrations.moe``: ``@use_experts_implementation``, ``ExpertsInterface``). This
module is one more implementation of that interface, registered under the name ``"lorakit"``
(:func:`register`): the same routed computation as transformers' ``grouped_mm``, plus the
adapters' rank-r terms::

    pairs (token t, expert e) sorted by expert ──► x_t  (S = tokens·top_k rows)
    y = x W_eᵀ (+ b_e)  +  Σ_adapters  s · (x A_eᵀ) B_eᵀ        # h = x A_eᵀ is (S, r)
    gate/activation ──► the same for down_proj ──► × routing weight ──► sum over top_k

Never is an (E, out, in) ``ΔW = s·B A`` formed, in forward or backward: the update costs two
grouped matmuls of rank r per weight, on the routed pairs only, and autograd's backward through
them is again rank r (``dA_e = s·(dy B_e)ᵀ x``, ``dB_e = s·dyᵀ h``). PEFT instead parametrises the
whole weight (``W + ΔW`` for all E experts at every forward, and its gradient in backward).

Which experts the interface serves is generic: the module's own ``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``, ``_apply_gate`` and ``act_fn`` (set by
transformers' decorator) say everything, so there is no per-architecture code. Per-expert factors
come from PEFT's ``ParamWrapper`` layout (:func:`expert_factors`): ``lora_A`` (r·E, in) is
expert-major, ``lora_B`` (out, r·E) rank-major.

Expert parallelism (``_is_expert_parallel``) is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError

IMPLEMENTATION = "lorakit"
"""The name of lorakit's experts implementation in transformers' ``ExpertsInterface``."""
UPDATES_KWARG = "lorakit_updates"
"""The keyword through which the adapter layer hands the active updates to :func:`experts_forward`."""


@dataclass(frozen=True)
class ExpertUpdate:
    """One adapter's factors on one expert weight: ``ΔW_e = scaling · B_e A_e`` in (out, in) terms.

    Attributes:
        A: (E, r, in) — or, with ``experts`` set, PEFT's stacked ``lora_A`` (r·E, in).
        B: (E, out, r) — or, with ``experts`` set, PEFT's stacked ``lora_B`` (out, r·E).
        scaling: alpha/r (or alpha/√r).
        tokens: (N,) bool, the tokens this update applies to (a multi-adapter batch); None: all.
        experts: E when ``A`` and ``B`` are PEFT's stacked parameters (the training path: the
            per-expert layout is then made inside the autograd op, one pass each way).
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    tokens: torch.Tensor | None = None
    experts: int | None = None


def expert_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``(A, B)`` from PEFT's stacked factors (views where possible, differentiable).

    Args:
        lora_A: (r·E, in), expert-major (rows ``e·r … e·r + r − 1`` belong to expert e).
        lora_B: (out, r·E), rank-major (column ``j·E + e`` is rank j of expert e).
        num_experts: E.

    Returns:
        A as (E, r, in) and B as (E, out, r), contiguous.
    """
    return lora_A.view(num_experts, -1, lora_A.shape[-1]), _experts_major(lora_B, num_experts)


def is_interface_experts(module: nn.Module) -> bool:
    """Whether ``module`` is an experts module dispatched through transformers' experts interface."""
    return (all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm",
                                             "_apply_gate", "num_experts"))
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def weight_names(module: nn.Module) -> tuple[str, str]:
    """The names of an interface experts module's two 3-D weights: (up or gate_up, down)."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def register() -> None:
    """Add :func:`experts_forward` to transformers' ``ExpertsInterface`` as ``"lorakit"`` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(IMPLEMENTATION) is not experts_forward:
        ExpertsInterface.register(IMPLEMENTATION, experts_forward)


def use_lorakit_experts(module: nn.Module) -> str | None:
    """Route ``module``'s config (shared by every experts module of that model) to ``"lorakit"``.

    Returns:
        The implementation it used before (to restore with :func:`restore_experts`), or None if it
        already used ``"lorakit"``.
    """
    register()
    config = module.config
    before = config._experts_implementation
    if before == IMPLEMENTATION:
        return None
    config._experts_implementation = IMPLEMENTATION
    return before


def restore_experts(module: nn.Module, implementation: str | None) -> None:
    """Give ``module``'s config back the experts implementation it had before lorakit's."""
    if implementation is not None and module.config._experts_implementation == IMPLEMENTATION:
        module.config._experts_implementation = implementation


# -- the experts implementation ------------------------------------------------------------------


def experts_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    **kwargs: dict[str, list[ExpertUpdate]] | None,
) -> torch.Tensor:
    """transformers' experts forward for ``self`` with LoRA updates on routed tokens only.

    Registered in ``ExpertsInterface`` as ``"lorakit"``; transformers calls it with ``self`` the
    experts module. Without updates it is a plain routed computation (the same numbers as
    ``grouped_mm`` up to summation order).

    Args:
        self: an experts module decorated with ``@use_experts_implementation``.
        hidden_states: (N, H) tokens.
        top_k_index: (N, K) each token's experts (ids ≥ E are dropped pairs).
        top_k_weights: (N, K) their routing weights.
        **kwargs: ``lorakit_updates``: weight name -> the active :class:`ExpertUpdate` list.

    Returns:
        (N, H) in the dtype of ``hidden_states``.
    """
    updates = kwargs.pop(UPDATES_KWARG, None) or {}
    if kwargs:
        raise TypeError(f"experts_forward got unexpected arguments {sorted(kwargs)}")
    if getattr(self, "_is_expert_parallel", False):
        raise LorakitError(f"{type(self).__name__}: expert parallelism is not supported by lorakit's expert LoRA")
    num_tokens, top_k = top_k_index.shape
    hidden_dim = hidden_states.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # (S,)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    counts = torch.bincount(sorted_ids.clamp(max=self.num_experts), minlength=self.num_experts + 1)
    offsets = counts[:self.num_experts].cumsum(0, dtype=torch.int32)  # (E,), pairs ≥ offsets[-1] are dropped
    routed = int(offsets[-1]) if offsets.numel() else 0
    x = hidden_states[perm[:routed] // top_k]  # (S', H): each routed pair's token, grouped by expert (not kept)
    ids = sorted_ids[:routed]
    up, down = weight_names(self)
    rows = perm[:routed] // top_k  # each pair's token: the up branch re-gathers x from these in backward
    y = _expert_linear(self, up, x, offsets, ids, updates.get(up, ()), rows, hidden_states)  # (S', 2I) or (S', I)
    y = self._apply_gate(y) if self.has_gate else self.act_fn(y)
    y = _expert_linear(self, down, y, offsets, ids, updates.get(down, ()), rows)  # (S', H)
    if self.has_post_expert_norm:
        y = self.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm[:routed]].unsqueeze(-1)
    if routed < expert_ids.numel():  # dropped pairs add nothing
        y = torch.cat([y, y.new_zeros(expert_ids.numel() - routed, hidden_dim)])
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    # The same reduction as transformers' implementations: back to token order, sum over top_k.
    return y[inverse].view(num_tokens, top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)


def _expert_linear(module: nn.Module, name: str, x: torch.Tensor, offsets: torch.Tensor, ids: torch.Tensor,
                   updates: list[ExpertUpdate] | tuple[()], rows: torch.Tensor,
                   source: torch.Tensor | None = None) -> torch.Tensor:
    """``x W_eᵀ + b_e + Σ s·(x A_eᵀ) B_eᵀ`` for pairs grouped by expert (``offsets``: group ends;
    ``rows``: each pair's token). With ``source`` (the layer's tokens, ``x = source[rows]``) the
    branch keeps ``source`` rather than ``x`` for backward."""
    weight = getattr(module, name)
    weight = weight if module.is_transposed else weight.transpose(-2, -1)  # (E, in, out)
    y = grouped_mm(x.to(weight.dtype), weight, offsets)  # (S', out)
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[ids]
    for update in updates:
        dtype = _branch_dtype(x, update.A)
        if update.tokens is not None:  # a multi-adapter batch: this adapter's pairs only
            pairs = update.tokens[rows].nonzero().squeeze(1)  # still grouped by expert
            counts = torch.bincount(ids[pairs], minlength=offsets.numel())
            z = ExpertLoraFn.apply(x[pairs], None, update.A, update.B, update.experts,
                                   counts.cumsum(0, dtype=torch.int32), update.scaling, dtype)
            y = y.index_add(0, pairs, z.to(y.dtype))
            continue
        z = ExpertLoraFn.apply(x if source is None else source, None if source is None else rows, update.A,
                               update.B, update.experts, offsets, update.scaling, dtype, x.detach())
        y = y.add_(z.to(y.dtype))  # y is a fresh product nothing saved for backward: no new (S, out) tensor
    return y


class ExpertLoraFn(torch.autograd.Function):
    """``z = s · (x A_eᵀ) B_eᵀ`` per expert group, ``x = source[rows]`` (or ``source``), in ``dtype``.

    Keeps ``source`` (for the first expert weight: the layer's tokens, top_k times smaller than the
    routed pairs), ``rows``, the factors in the compute layout and the rank-r ``h = s · x A_eᵀ``
    (S, r; the scale is applied there, on r columns, not on the out columns of z or dB).
    Backward, from ``g = dz``::

        dB_e = g_eᵀ h_e              dh = s · g B_e          (rank r)
        dA_e = dh_eᵀ x_e             dx = dh A_e, scattered back to source through rows

    with ``x`` gathered (and cast) again. Nothing of size (E, out, in) in either pass. With
    ``experts`` set, ``A`` and ``B`` are PEFT's stacked parameters: expert e's factors are laid
    out (and cast) here, and their gradients go back to PEFT's layout, each in one cast and at most
    one 2-D transpose (``lora_B`` (out, r·E) rank-major is an (out·r, E) matrix whose transpose is
    (E, out, r): every expert's B_e, contiguous — N-d permuted copies are several times slower).
    ``gathered`` (optional): ``source[rows]`` already gathered by the caller, used in forward only.
    """

    @staticmethod
    def forward(ctx, source, rows, A, B, experts: int | None, offsets, scaling: float, dtype: torch.dtype,
                gathered: torch.Tensor | None = None):
        x = (gathered if gathered is not None else source if rows is None else source[rows]).to(dtype)  # (S, in)
        ctx.factor_dtypes, ctx.experts, ctx.B_shape = (A.dtype, B.dtype), experts, B.shape
        if experts is None:
            At = A.to(dtype).transpose(-2, -1)  # (E, in, r)
            Bt = B.to(dtype).transpose(-2, -1)  # (E, r, out)
        else:  # lora_A (r·E, in) is expert-major: a view; lora_B (out, r·E) is rank-major: one transpose
            At = A.view(experts, -1, A.shape[-1]).to(dtype).transpose(-2, -1)
            Bt = _experts_major(B.to(dtype), experts).transpose(-2, -1)  # (E, r, out), each column-major
        h = grouped_mm(x, At, offsets).mul_(scaling)  # (S, r), scaled: the rank-r path stays small
        z = grouped_mm(h, Bt, offsets)  # (S, out)
        ctx.save_for_backward(source, rows, At, Bt, h, offsets)
        ctx.scaling, ctx.dtype = scaling, dtype
        return z

    @staticmethod
    def backward(ctx, g):
        source, rows, At, Bt, h, offsets = ctx.saved_tensors
        s, experts = ctx.scaling, ctx.experts
        g = g.to(ctx.dtype)
        dh = grouped_mm(g, Bt.transpose(-2, -1), offsets).mul_(s)  # (S, r)
        dA = dB = dsource = None
        if ctx.needs_input_grad[3]:
            dBt = grouped_outer(h, g, offsets)  # (E, r, out), s included in h; (g, h) would transpose g
            if experts is None:
                dB = dBt.transpose(-2, -1).to(ctx.factor_dtypes[1])  # (E, out, r)
            else:  # back to lora_B's (out, r·E) rank-major layout: rows of out moved, one 2-D transpose, a cast
                dB = dBt.transpose(0, 1).reshape(-1, dBt.shape[-1]).t().contiguous().to(ctx.factor_dtypes[1])
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            if ctx.needs_input_grad[2]:
                x = (source if rows is None else source[rows]).to(ctx.dtype)
                dA = grouped_outer(dh, x, offsets).to(ctx.factor_dtypes[0])  # (E, r, in)
                dA = dA if experts is None else dA.view(-1, dA.shape[-1])  # lora_A's (r·E, in)
            if ctx.needs_input_grad[0]:
                dx = grouped_mm(dh, At.transpose(-2, -1), offsets).to(source.dtype)  # (S, in)
                dsource = dx if rows is None else torch.zeros_like(source).index_add_(0, rows, dx)
        return dsource, None, dA, dB, None, None, None, None, None


def _experts_major(B: torch.Tensor, experts: int) -> torch.Tensor:
    """PEFT's rank-major ``lora_B`` (out, r·E) as (E, out, r), contiguous: one 2-D transpose."""
    out = B.shape[0]
    return B.reshape(-1, experts).t().contiguous().view(experts, out, -1)


def _branch_dtype(x: torch.Tensor, A: torch.Tensor) -> torch.dtype:
    # Under autocast the low-rank terms run in the autocast dtype, as nn.Linear would; else in the
    # adapter's dtype (fp32 over a half-precision base).
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else A.dtype


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (S, K) grouped by expert times that expert's ``weight[e]`` (K, N): (S, N).

    ``offsets[e]`` is the end of group e. Uses ``torch.nn.functional.grouped_mm`` where the
    device, dtype and strides allow it, else one ``mm`` per non-empty group (same numbers).
    """
    if _native_grouped_mm(x, weight):
        return F.grouped_mm(x, weight, offs=offsets)
    parts, start = [], 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            parts.append(x[start:end] @ weight[e])
        start = end
    if not parts:
        return x.new_zeros(0, weight.shape[-1])
    return torch.cat(parts)


def grouped_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``a_eᵀ b_e`` for each group e of rows (``offsets``: group ends): (E, a.cols, b.cols), zeros for
    an empty group. ``a`` (S, M) and ``b`` (S, N)."""
    groups = offsets.numel()
    if _native_grouped_outer(a, b):
        return F.grouped_mm(a.T, b, offs=offsets)
    out = a.new_zeros(groups, a.shape[-1], b.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(a[start:end].T, b[start:end], out=out[e])
        start = end
    return out


def _native_grouped_outer(a: torch.Tensor, b: torch.Tensor) -> bool:
    # F.grouped_mm with the groups along the shared dimension: aᵀ is a transposed view (strides 1, M).
    if not _native_device_dtype(a, b) or not (a.is_contiguous() and b.is_contiguous()):
        return False
    size = a.element_size()
    return (a.shape[-1] * size % 16 == 0 and b.shape[-1] * size % 16 == 0
            and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def _native_device_dtype(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype or x.numel() == 0:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return x.device.type == "cpu"


def _native_grouped_mm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not _native_device_dtype(x, weight):
        return False
    size = x.element_size()
    if x.stride(-1) != 1 or (weight.stride(-1) != 1 and weight.stride(-2) != 1):
        return False  # rows of x contiguous; each group's matrix row- or column-major
    # The kernel (and its backward) needs 16-byte aligned pointers, row strides and inner sizes.
    dims = (x.shape[-1], weight.shape[-1])
    strides = [s for t in (x, weight) for s in t.stride() if s != 1]
    return (all(d * size % 16 == 0 for d in dims) and all(s * size % 16 == 0 for s in strides)
            and x.data_ptr() % 16 == 0 and weight.data_ptr() % 16 == 0)


def reference(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
              top_k_weights: torch.Tensor, updates: dict[str, list[ExpertUpdate]]) -> torch.Tensor:
    """The same function by a token loop with each expert's merged weight ``W_e + s·B_e A_e``, in fp64 (tests)."""
    up, down = weight_names(module)
    out = torch.zeros_like(hidden_states, dtype=torch.float64)

    def linear(name: str, x: torch.Tensor, e: int) -> torch.Tensor:
        weight = getattr(module, name)[e].double()
        weight = weight if module.is_transposed else weight.T  # (in, out)
        for u in updates.get(name, ()):
            weight = weight + (u.B[e].double() @ u.A[e].double()).T * u.scaling
        y = x @ weight
        return y + getattr(module, f"{name}_bias")[e].double() if module.has_bias else y

    for t in range(hidden_states.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            if e >= module.num_experts:
                continue
            y = linear(up, hidden_states[t:t + 1].double(), e)
            y = module._apply_gate(y) if module.has_gate else module.act_fn(y)
            y = linear(down, y, e)
            if module.has_post_expert_norm:
                y = module.post_expert_norm(y)
            out[t] += y[0] * top_k_weights[t, k].double()
    return out.to(hidden_states.dtype)
