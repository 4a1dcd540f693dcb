"""NF4 base weights (QLoRA) through bitsandbytes, with our own autograd for the frozen matmul.

Storage is bitsandbytes' own ``Linear4bit`` (so transformers, PEFT and bnb read the model as
usual): NF4 codes two per byte, blocks of 64 over the flattened weight, double-quantised absmax
(8-bit, blocks of 256): 4.127 bits per parameter (REFERENCE.md "NF4 / QLoRA"). Every bnb option
is set explicitly — bnb's own default is fp4.

The matmul does not go through bnb's ``Linear4bit.forward``: after ``generate()`` bnb may switch
to a 4-bit GEMV with no autograd on CPU, and the adapter gradients silently become zero. Instead
:class:`_NF4Matmul` (y = x Wᵀ):

- forward: dequantise W (compute dtype), ``y = x Wᵀ``, free W;
- backward: dequantise W again, ``dx = dy W``; no weight gradient (the base is frozen).

So the full-precision W lives only inside one call, never between forward and backward.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn

from lorakit.adapters.experts import is_interface_experts, weight_names
from lorakit.errors import LorakitError

NF4_OPTIONS = dict(quant_type="nf4", blocksize=64, compress_statistics=True, quant_storage=torch.uint8)


def _bnb():
    try:
        import bitsandbytes
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise LorakitError(
            "4-bit (NF4) base weights need bitsandbytes: pip install 'bitsandbytes>=0.50'"
        ) from err
    return bitsandbytes


def is_quantized(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer whose weight is already quantised."""
    weight = getattr(module, "weight", None)
    return type(weight).__name__ == "Params4bit" and getattr(weight, "quant_state", None) is not None


def dequantize(module: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight of a 4-bit layer in ``dtype``."""
    bnb = _bnb()
    weight = module.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)


class _NF4Matmul(torch.autograd.Function):
    """``y = x Wᵀ`` with W stored as NF4; dequantised in forward and again in backward.

    Backward: ``dx = dy W`` (W frozen: no dW). Saved between passes: nothing but the 4-bit module.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        ctx.module = module
        weight = dequantize(module, x.dtype)  # (out, in), lives only in this call
        return x @ weight.T

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        weight = dequantize(ctx.module, grad_out.dtype)
        return grad_out @ weight, None


def nf4_linear(x: torch.Tensor, module: nn.Module, with_bias: bool = True) -> torch.Tensor:
    """The 4-bit layer's output ``x Wᵀ (+ b)``, through :class:`_NF4Matmul`."""
    compute = getattr(module, "compute_dtype", None) or x.dtype
    y = _NF4Matmul.apply(x.to(compute), module)
    if with_bias and module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y.to(x.dtype)


@functools.cache
def nf4_linear_class() -> type:
    """bitsandbytes' ``Linear4bit`` storage with a forward through :func:`nf4_linear`.

    A subclass, so transformers, PEFT and bnb still see a ``Linear4bit``; its forward never takes
    bnb's 4-bit GEMV path (no autograd after ``generate()`` on CPU, and it rewrites the quant
    state in place), so input gradients flow through layers without adapters too.
    """
    bnb = _bnb()

    class NF4Linear(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nf4_linear(x, self)

    return NF4Linear


def quantize_linear(linear: nn.Linear, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """An NF4 layer (double quant, blocks of 64; bnb ``Linear4bit`` storage) holding ``linear``'s weight."""
    bnb = _bnb()
    quantized = nf4_linear_class()(
        linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
        compress_statistics=NF4_OPTIONS["compress_statistics"], quant_type=NF4_OPTIONS["quant_type"],
        quant_storage=NF4_OPTIONS["quant_storage"], device="meta",
    )
    weight = bnb.nn.Params4bit(linear.weight.data.detach().float().contiguous(), requires_grad=False,
                               **NF4_OPTIONS)
    quantized.weight = weight._quantize(linear.weight.device)
    if linear.bias is not None:
        quantized.bias = nn.Parameter(linear.bias.data.detach().clone(), requires_grad=False)
    quantized.train(linear.training)
    return quantized


def quantize_model(model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but the output head) by NF4, in place.

    Call it before adding adapters. Returns the quantised module names.

    Raises:
        LorakitError: the model has mixture-of-experts weights (see :func:`experts_refusal`), or no
            ``nn.Linear`` at all.
    """
    expert_params = sum(getattr(m, w).numel() for m in model.modules() if is_interface_experts(m)
                        for w in weight_names(m))
    if expert_params:
        raise LorakitError(experts_refusal(expert_params, sum(p.numel() for p in model.parameters())))
    head = getattr(model, "get_output_embeddings", lambda: None)()
    done = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or module is head:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(module, compute_dtype))
        done.append(name)
    if not done:
        raise LorakitError("quantize_model found no nn.Linear layer to quantise")
    return done


def experts_refusal(expert_params: int, total: int) -> str:
    """Why QLoRA is refused on a mixture-of-experts model, and what to do instead."""
    return (f"QLoRA on a mixture-of-experts model: {expert_params:,} of its {total:,} parameters "
            f"({100 * expert_params / total:.0f} %) are 3-D expert weights, and lorakit stores only nn.Linear layers "
            "in NF4 — it has no NF4 storage and kernel for expert weights yet, so a 'QLoRA' here would keep most of "
            "the model in 16 bits and save little. Train with method: lora on a bf16 base (the expert LoRA never "
            "forms an expert-sized ΔW), or plan it with `lorakit estimate M --method lora`")


def dense_copy(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantised weight (for merging into a 4-bit base)."""
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=module.weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantize(module, dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.to(dtype))
    linear.requires_grad_(False)
    linear.train(module.training)
    return linear


def warn_dequantized(name: str = "") -> None:
    warnings.warn(
        f"merging into a 4-bit base{f' ({name})' if name else ''}: the layer is dequantised to a dense "
        "weight first; the merged model carries NF4 rounding of the original weights", stacklevel=3)


def bits_per_parameter(module: nn.Module) -> float:
    """Stored bits per weight of a 4-bit layer: codes, absmax and the double-quant statistics."""
    weight = module.weight
    state = weight.quant_state
    total = weight.data.numel() * weight.data.element_size()
    total += state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        nested = state.state2
        total += nested.absmax.numel() * nested.absmax.element_size() + nested.code.numel() * nested.code.element_size()
        total += 4  # the mean offset
    total += state.code.numel() * state.code.element_size()
    return 8 * total / (module.in_features * module.out_features)
