"""LoRA layers: a frozen base module plus named low-rank updates.

::

    x ──► W (frozen, out×in) ───────────────────────────────┐
    │                                                        + ──► y
    └──► dropout ──► A (r×in) ──► B (out×r) ──► × s ────────┘

    y = W x + b + s · B A dropout(x),   s = alpha/r  (rsLoRA: alpha/√r)

LoRA: Hu et al. 2021, "Low-Rank Adaptation of Large Language Models", §4.1. rsLoRA: Kalajdzievski
2023. A fresh adapter has B = 0 (A kaiming-uniform), so it changes nothing until trained.

What is notable here:

- Adapters live in ``nn.ModuleDict``/``nn.ParameterDict`` keyed by name, with PEFT's attribute
  names (``base_layer``, ``lora_A``, ``lora_B``, ``lora_embedding_A``…), so a model's state-dict
  keys map to PEFT's file keys by dropping the adapter name.
- Several adapters may be active at once; their updates add up. ``disabled`` skips them all.
- Merging is an explicit call (never a side effect of ``eval()``), idempotent per adapter, and
  checks the update for NaN/inf before any weight changes.
- Adapter weights stay fp32 when the base is fp16/bf16; the branch computes in fp32 and the sum
  is cast back to the base output's dtype.
- One layer class per kind of base weight: ``LoraLinear`` covers ``nn.Linear`` and transformers'
  ``Conv1D`` (which stores W as in×out, PEFT's ``fan_in_fan_out``); ``LoraEmbedding`` has A and B
  the other way round (A = 0, B ~ N(0, 1)), as in PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class AdapterOptions:
    """What one adapter looks like on one layer (after rank/alpha patterns)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    init: bool | str = True  # True/"kaiming", "gaussian", or False (B random: for tests)
    lora_bias: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r


class LoraLayer(nn.Module):
    """Bookkeeping shared by every LoRA layer: names, scaling, active/merged sets, merging."""

    adapter_attrs: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.options: dict[str, AdapterOptions] = {}
        self.scaling: dict[str, float] = {}
        self.active: list[str] = []  # adapters added in forward (when not merged)
        self.merged: list[str] = []  # adapters currently folded into the base weight
        self.disabled = False

    # -- adapters ------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.options)

    def add(self, name: str, options: AdapterOptions) -> None:
        """Create adapter ``name`` (fp32 if the base weight is half precision) and initialise it."""
        if name in self.options:
            raise LorakitError(f"adapter {name!r} already exists on this layer; delete it first")
        self.options[name] = options
        self.scaling[name] = options.scaling
        self._create(name, options)
        self._init(name, options.init)
        weight = self.base_weight
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        self._move_parameters(name, weight.device, dtype)
        self.train(self.base_layer.training)  # new modules start in train mode; follow the model's

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if name not in self.options:
            return
        if name in self.merged:
            self._unmerge_one(name)
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        del self.options[name], self.scaling[name]
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        """Make ``names`` (those present on this layer) the active adapters."""
        self.active = [n for n in names if n in self.options]

    # -- subclass hooks ------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _create(self, name: str, options: AdapterOptions) -> None:
        raise NotImplementedError

    def _init(self, name: str, init: bool | str) -> None:
        raise NotImplementedError

    def _move_parameters(self, name: str, device: torch.device, dtype: torch.dtype) -> None:
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name not in container:
                continue
            item = container[name]
            if isinstance(item, nn.Parameter):
                item.data = item.data.to(device=device, dtype=dtype)
            else:
                item.to(device=device, dtype=dtype)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in the base weight's layout, fp32."""
        raise NotImplementedError

    def delta_bias(self, name: str) -> torch.Tensor | None:
        """The bias the adapter adds (``s · lora_B.bias``), or None."""
        return None

    # -- merging -------------------------------------------------------------------------------

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight. Idempotent.

        Raises:
            LorakitError: the update holds NaN/inf (nothing is changed), or a ``lora_bias``
                adapter meets a base layer without a bias.
        """
        names = self.active if names is None else [n for n in names if n in self.options]
        todo = [n for n in names if n not in self.merged]
        updates = []
        for name in todo:  # compute and check everything before touching a weight
            delta, bias = self.delta_weight(name), self.delta_bias(name)
            if not torch.isfinite(delta).all() or (bias is not None and not torch.isfinite(bias).all()):
                raise LorakitError(f"adapter {name!r} holds NaN or inf values; refusing to merge it")
            if bias is not None and self.base_layer.bias is None:
                raise LorakitError(
                    f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into; "
                    "keep it unmerged"
                )
            updates.append((name, delta, bias))
        for name, delta, bias in updates:
            _add_(self.base_weight, delta)
            if bias is not None:
                _add_(self.base_layer.bias, bias)
            self.merged.append(name)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (newest first)."""
        while self.merged:
            self._unmerge_one(self.merged[-1])

    def _unmerge_one(self, name: str) -> None:
        _add_(self.base_weight, -self.delta_weight(name))
        bias = self.delta_bias(name)
        if bias is not None:
            _add_(self.base_layer.bias, -bias)
        self.merged.remove(name)

    # -- forward -------------------------------------------------------------------------------

    def _branch_names(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def extra_repr(self) -> str:
        parts = [f"{n}: r={o.r}, s={self.scaling[n]:g}" for n, o in self.options.items()]
        return "; ".join(parts)


class LoraLinear(LoraLayer):
    """LoRA over ``nn.Linear`` (W is out×in) or transformers ``Conv1D`` (W is in×out)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        weight = base_layer.weight
        self.in_features, self.out_features = weight.shape[::-1] if not fan_in_fan_out else weight.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()

    def _create(self, name: str, options: AdapterOptions) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, options.r, bias=False)
        self.lora_B[name] = nn.Linear(options.r, self.out_features, bias=options.lora_bias)
        self.lora_dropout[name] = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    def _init(self, name: str, init: bool | str) -> None:
        if init is False:
            return  # nn.Linear's own init for A and B: a non-zero update (tests, experiments)
        A, B = self.lora_A[name], self.lora_B[name]
        if init in (True, "kaiming"):
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        elif init == "gaussian":
            nn.init.normal_(A.weight, std=1 / self.options[name].r)
        else:
            raise LorakitError(f"unknown init_lora_weights {init!r} (expected kaiming or gaussian)")
        nn.init.zeros_(B.weight)
        if B.bias is not None:
            nn.init.zeros_(B.bias)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        delta = (B @ A) * self.scaling[name]  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def delta_bias(self, name: str) -> torch.Tensor | None:
        bias = self.lora_B[name].bias
        return None if bias is None else bias.float() * self.scaling[name]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        for name in self._branch_names():
            A, B = self.lora_A[name], self.lora_B[name]
            h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (…, r): the rank-r path stays small
            result = result + (B(h) * self.scaling[name]).to(result.dtype)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA over ``nn.Embedding``: ``E[ids] + s · (A[:, ids])ᵀ Bᵀ``, A (r×vocab), B (dim×r)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, options: AdapterOptions) -> None:
        if options.lora_bias:
            raise LorakitError("lora_bias is not supported on embedding layers (PEFT does not save it either)")
        vocab, dim = self.base_layer.weight.shape
        self.lora_embedding_A[name] = nn.Parameter(torch.empty(options.r, vocab))
        self.lora_embedding_B[name] = nn.Parameter(torch.empty(dim, options.r))

    def _init(self, name: str, init: bool | str) -> None:
        A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
        if init is False:  # both random: a non-zero update
            nn.init.normal_(A)
        else:
            nn.init.zeros_(A)
        nn.init.normal_(B)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_embedding_A[name].float(), self.lora_embedding_B[name].float()
        return (B @ A).T * self.scaling[name]  # (vocab, dim)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        # Scaled embeddings (Gemma: × √dim in forward) scale the update too, so merged == unmerged.
        embed_scale = getattr(base, "embed_scale", None)
        for name in self._branch_names():
            A, B = self.lora_embedding_A[name], self.lora_embedding_B[name]
            h = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)  # (…, r)
            update = (h @ B.T) * self.scaling[name]  # (…, dim)
            if embed_scale is not None:
                update = update * torch.as_tensor(embed_scale, dtype=update.dtype, device=update.device)
            result = result + update.to(result.dtype)
        return result


def wrap(module: nn.Module, fan_in_fan_out: bool | None = None) -> LoraLayer:
    """The LoRA layer for ``module``: Linear, Conv1D or Embedding.

    Raises:
        LorakitError: the module is of another kind.
    """
    if isinstance(module, nn.Linear):
        return LoraLinear(module, fan_in_fan_out=False)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if is_conv1d(module):
        return LoraLinear(module, fan_in_fan_out=True)
    raise LorakitError(
        f"LoRA supports nn.Linear, nn.Embedding and transformers Conv1D; got {type(module).__name__}"
    )


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer storing W as in×out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _add_(param: torch.Tensor, delta: torch.Tensor) -> None:
    # In place so optimisers and tied weights keep pointing at the same tensor; fp32 sum, cast back.
    with torch.no_grad():
        param.copy_((param.float() + delta.to(param.device)).to(param.dtype))
