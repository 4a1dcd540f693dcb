"""LoRA variants: how one adapter changes a linear layer's output and its weight.

A variant is a small stateless strategy object (as PEFT's ``LoraVariant``); a layer keeps one per
adapter in ``layer.variants[name]``. What an adapter owns lives on the layer as declared modules,
parameters and buffers, so ``state_dict()`` and ``.to()`` see it: A and B in ``lora_A`` /
``lora_B`` for every variant, and whatever the variant adds (DoRA: ``lora_magnitude_vector``).

- :class:`Lora` (:data:`LORA`): ``y = W x + b + s · B A dropout(x)``, ``ΔW = s · B A``. Training
  with one such adapter over a frozen base runs through the layer's fused op
  (:mod:`lorakit.adapters.fused`).
- :class:`~lorakit.adapters.dora.Dora` (:data:`~lorakit.adapters.dora.DORA`):
  ``y = m/‖W + s·B A‖_row ⊙ (W x + s·B A x) + b``; it rescales the base output, so at most one
  DoRA adapter is active at a time (plain ones may add to it).

A new variant subclasses :class:`Variant` in its own module and is chosen in
:func:`lorakit.adapters.lora.variant_for`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.adapters.lora import AdapterOptions, LoraLayer, LoraLinear


class Variant:
    """The strategy interface; the defaults are plain LoRA's (an update ``ΔW`` that adds)."""

    rescales_base = False
    """True when the adapter's output is not the base's plus an update (DoRA): then it computes the
    whole layer and no other such adapter may be active with it."""

    def create(self, layer: LoraLayer, name: str, options: AdapterOptions) -> None:
        """Declare the adapter's own state on ``layer``, once A and B are initialised (plain LoRA: none)."""

    def forward(self, layer: LoraLinear, name: str, x: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapter ``name`` the only active one."""
        result = layer.base_forward(x)
        return result + layer.lora_branch(name, x).to(result.dtype)

    def merged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (fp32, stored layout) with the adapter folded in."""
        return weight + layer.delta_weight(name).to(weight.device)

    def unmerged_weight(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`merged_weight`."""
        return weight - layer.delta_weight(name).to(weight.device)


class Lora(Variant):
    """Plain LoRA: the defaults. (One plain adapter training over a frozen base takes the layer's fused
    op instead, :meth:`LoraLinear._fused_forward <lorakit.adapters.lora.LoraLinear._fused_forward>`:
    the same numbers, less memory.)"""


LORA = Lora()
