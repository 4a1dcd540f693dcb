"""Where a linear layer keeps its weight, said once.

``nn.Linear`` (and bitsandbytes' ``Linear4bit``, a subclass) stores W as (out, in) and computes
``x Wᵀ``; transformers' ``Conv1D`` (GPT-2 and its relatives) stores W as (in, out) and computes
``x W`` — what PEFT calls ``fan_in_fan_out``. Code that needs W as (out, in) calls :func:`out_in`
(its own inverse: it also turns an (out, in) matrix back into the stored layout); code that needs
the product calls :func:`matmul`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer storing W as in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """A linear layer LoRA can wrap: ``nn.Linear`` (``Linear4bit`` included) or ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of a linear layer (see :func:`is_linear`)."""
    if is_conv1d(module):
        in_features, out_features = module.weight.shape
        return in_features, out_features, True
    # nn.Linear and Linear4bit (whose stored weight is packed) both say their sizes
    return module.in_features, module.out_features, False


def out_in(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The stored weight as (out, in) (a view), or an (out, in) matrix in the stored layout."""
    return weight.T if fan_in_fan_out else weight


def matmul(x: torch.Tensor, weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """``x Wᵀ`` (…, out) for a weight stored either way, without its bias."""
    return x @ weight if fan_in_fan_out else F.linear(x, weight)
