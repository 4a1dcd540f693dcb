"""PiSSA initialisation (Meng et al. 2024, "PiSSA", §3): start from W's principal components.

::

    W = U S Vᵀ                                    (SVD of the (out, in) weight, fp32)
    B = U_r √(S_r / s),  A = √(S_r / s) V_rᵀ      so that s·B A is W's best rank-r part
    W ← W − s·B A                                 (the base becomes the residual)

The model's output is unchanged at init; training moves the principal part instead of a zero
update. ``init_lora_weights="pissa"`` uses a full SVD, ``"pissa_niter_K"`` a randomised one with K
subspace iterations (fast for large matrices).

Because the base is changed, a PiSSA adapter only works on the residual base. :func:`to_lora`
turns it into a plain LoRA of rank 2r that works on the *original* base (as PEFT does):
``s·B A − s·B₀ A₀ = s·[B, −B₀] [A; A₀]``, with ``B₀, A₀`` the values at init, which the layer
keeps as buffers (:class:`StartingFactors`, in ``layer.lora_initial[name]``).

The math is pure functions on tensors; :meth:`lorakit.adapters.lora.LoraLinear.add` applies them.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError


def is_pissa(init: bool | str) -> bool:
    return isinstance(init, str) and (init == "pissa" or init.startswith("pissa_niter_"))


def factors(weight: torch.Tensor, r: int, s: float, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` from the top-r singular triplets of ``weight`` ((out, in), fp32): ``s·B A`` is its
    best rank-r part. A is (r, in), B is (out, r)."""
    if method == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=_niter(method))
        Vh = V.T
    root = (S / s).sqrt()
    return root[:, None] * Vh, U * root


def residual(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
    """``W − s·B A``: the base weight PiSSA leaves ((out, in))."""
    return weight - s * (B @ A)


def to_lora(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank 2r, fp32, such that ``s·B' A' = s·B A − s·B₀ A₀``: the change since init."""
    A, B = A.detach().float(), B.detach().float()
    return torch.cat([A, A0.float().to(A.device)], dim=0), torch.cat([B, -B0.float().to(B.device)], dim=1)


class StartingFactors(nn.Module):
    """A PiSSA adapter's A₀ and B₀ as buffers (in ``state_dict()``, moved by ``.to()``), for :func:`to_lora`."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A.detach().clone())
        self.register_buffer("B", B.detach().clone())


def _niter(method: str) -> int:
    try:
        return int(method.removeprefix("pissa_niter_"))
    except ValueError:
        raise LorakitError(f"init_lora_weights {method!r}: expected 'pissa' or 'pissa_niter_<int>'") from None
