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
``s·B A − s·B₀ A₀ = s·[B, −B₀] [A; A₀]``, with ``B₀, A₀`` the values at init, which the layer keeps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lorakit.errors import LorakitError

if TYPE_CHECKING:
    from lorakit.adapters.lora import LoraLinear


def is_pissa(init: bool | str) -> bool:
    return isinstance(init, str) and (init == "pissa" or init.startswith("pissa_niter_"))


def init(layer: LoraLinear, name: str, method: str) -> None:
    """Set A, B from W's top-r singular triplets and make the base weight the residual."""
    from lorakit.adapters import quant

    if quant.is_quantized(layer.base_layer):
        raise LorakitError("pissa initialisation needs a dense base weight; quantise after initialising, "
                           "or use the default initialisation with QLoRA")
    r, s = layer.options[name].r, layer.scaling[name]
    stored = layer.base_layer.weight
    weight = stored.detach().float()
    weight = weight.T if layer.fan_in_fan_out else weight  # (out, in)
    if method == "pissa":
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, :r], S[:r], Vh[:r]
    else:
        niter = _niter(method)
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = (S / s).sqrt()
    B = U * root  # (out, r)
    A = root[:, None] * Vh  # (r, in)
    with torch.no_grad():
        layer.lora_A[name].weight.copy_(A)
        layer.lora_B[name].weight.copy_(B)
        residual = weight - s * (B @ A)
        stored.copy_((residual.T if layer.fan_in_fan_out else residual).to(stored.dtype))
    layer.__dict__.setdefault("pissa_initial", {})[name] = (A.clone(), B.clone())


def to_lora(layer: LoraLinear, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A', B')`` of rank 2r such that ``s·B' A'`` is the adapter's change since init."""
    initial = layer.__dict__.get("pissa_initial", {}).get(name)
    if initial is None:
        raise LorakitError(
            f"adapter {name!r}: the PiSSA starting values are not in memory (the adapter was loaded, not "
            "initialised here), so it cannot be converted to a plain LoRA; save it as PiSSA instead")
    A0, B0 = initial
    A, B = layer.lora_A[name].weight.detach().float(), layer.lora_B[name].weight.detach().float()
    return torch.cat([A, A0.to(A.device)], dim=0), torch.cat([B, -B0.to(B.device)], dim=1)


def _niter(method: str) -> int:
    try:
        return int(method.removeprefix("pissa_niter_"))
    except ValueError:
        raise LorakitError(f"init_lora_weights {method!r}: expected 'pissa' or 'pissa_niter_<int>'") from None
