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
- Each adapter has a variant (:mod:`lorakit.adapters.variants`): plain LoRA or DoRA, a small
  strategy object that computes the layer's output and its merged weight; what it owns sits on
  the layer as declared modules and buffers (``state_dict()`` and ``.to()`` see them). Training
  with one plain adapter over a dense frozen base runs through one fused autograd op
  (:mod:`lorakit.adapters.fused`): it keeps only the input, the positions dropout removed and
  the rank-r intermediate for backward, and skips all dropout work without dropout (over a 4-bit
  base, W is dequantised inside it, in forward and again in backward). Several adapters,
  ``lora_bias`` or a trained base weight take the plain path.
- Initialisations are functions: kaiming/gaussian here, PiSSA in :mod:`lorakit.adapters.pissa`
  (whose starting factors the layer keeps as buffers in ``lora_initial``).
- One layer class per kind of base weight: ``LoraLinear`` covers ``nn.Linear`` and transformers'
  ``Conv1D`` (which stores W as in×out, PEFT's ``fan_in_fan_out``: :mod:`lorakit.adapters.layout`);
  ``LoraEmbedding`` has A and B the other way round (A = 0, B ~ N(0, 1)), as in PEFT.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import fused, layout, peft_format, pissa, quant
from lorakit.adapters.dora import DORA
from lorakit.adapters.layout import is_conv1d, is_linear
from lorakit.adapters.variants import LORA, Lora, Variant
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
    use_dora: bool = False

    @property
    def scaling(self) -> float:
        return peft_format.scaling(self.alpha, self.r, self.use_rslora)


class LoraLayer(nn.Module):
    """Bookkeeping shared by every LoRA layer: names, scaling, active/merged sets, merging."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.options: dict[str, AdapterOptions] = {}
        self.scaling: dict[str, float] = {}
        self.variants: dict[str, Variant] = {}  # how each adapter changes the layer (stateless strategies)
        self.active: list[str] = []  # adapters added in forward (when not merged)
        self.merged: list[str] = []  # adapters currently folded into the base weight
        self.disabled = False

    # -- adapters ------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.options)

    @property
    def adapter_attrs(self) -> tuple[str, ...]:
        """The per-adapter containers: every child named ``lora_*`` (:func:`peft_format.is_adapter_container`)."""
        return tuple(n for n, _ in self.named_children() if peft_format.is_adapter_container(n))

    def add(self, name: str, options: AdapterOptions) -> None:
        """Create adapter ``name`` (fp32 if the base weight is half precision) and initialise it."""
        if name in self.options:
            raise LorakitError(f"adapter {name!r} already exists on this layer; delete it first")
        self.options[name] = options  # first: _create and _init read them
        self.scaling[name] = options.scaling
        self.variants[name] = variant_for(options)
        try:
            self._create(name, options)
            self._init(name, options.init)
            weight = self.base_weight
            dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
            self._move_parameters(name, weight.device, dtype)
            self.variants[name].create(self, name, options)  # its own state, from the initialised A and B
        except BaseException:
            self._discard(name)  # a refused adapter leaves nothing behind: not its name, not half its tensors
            raise
        self.train(self.base_layer.training)  # new modules start in train mode; follow the model's

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` (unmerging it first if it is merged)."""
        if name not in self.options:
            return
        if name in self.merged:
            self._unmerge_one(name)
        self._discard(name)

    def _discard(self, name: str) -> None:
        for attr in self.adapter_attrs:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in (self.options, self.scaling, self.variants):
            table.pop(name, None)
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

    def dense_weight(self) -> torch.Tensor:
        """The base weight in its own layout, fp32 (dequantised if stored in 4 bits)."""
        return self.base_layer.weight.float()

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

    def merged_weights(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias (fp32, base layout) with ``names`` folded in; changes nothing.

        Raises:
            LorakitError: an update holds NaN/inf, or a ``lora_bias`` adapter meets a base
                layer without a bias.
        """
        weight = self.dense_weight()
        bias = None if getattr(self.base_layer, "bias", None) is None else self.base_layer.bias.float()
        for name in names:
            weight = self._merge_weight(name, weight)
            delta_bias = self.delta_bias(name)
            if delta_bias is not None:
                if bias is None:
                    raise LorakitError(
                        f"adapter {name!r} has lora_bias but the base layer has no bias to merge it into; "
                        "keep it unmerged")
                bias = bias + delta_bias
        if not torch.isfinite(weight).all() or (bias is not None and not torch.isfinite(bias).all()):
            raise LorakitError(f"adapter(s) {', '.join(names)} hold NaN or inf values; refusing to merge")
        return weight, bias

    def check_merge(self, names: list[str]) -> None:
        """Raise what :meth:`merge` of ``names`` would raise (NaN/inf), changing nothing."""
        self.merged_weights(names)

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the base weight. Idempotent.

        A 4-bit base is first replaced by a dense copy of its dequantised weight (with a warning):
        a merged weight cannot be stored in NF4 without new rounding.
        """
        names = self.active if names is None else [n for n in names if n in self.options]
        todo = [n for n in names if n not in self.merged]
        if not todo:
            return
        weight, bias = self.merged_weights(todo)  # computed and checked before anything changes
        self._densify()
        self._write(weight, bias)
        self.merged.extend(todo)

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (newest first)."""
        while self.merged:
            self._unmerge_one(self.merged[-1])

    def _unmerge_one(self, name: str) -> None:
        weight = self._unmerge_weight(name, self.dense_weight())
        bias = self.delta_bias(name)
        self._write(weight, None if bias is None else self.base_layer.bias.float() - bias)
        self.merged.remove(name)

    def _merge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.variants[name].merged_weight(self, name, weight)

    def _unmerge_weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        return self.variants[name].unmerged_weight(self, name, weight)

    def _densify(self) -> None:
        """Hook: replace a quantised base by a dense one before writing merged weights."""

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        # In place so optimisers and tied weights keep pointing at the same tensor; cast back.
        with torch.no_grad():
            self.base_layer.weight.copy_(weight.to(self.base_layer.weight.dtype))
            if bias is not None:
                self.base_layer.bias.copy_(bias.to(self.base_layer.bias.dtype))

    # -- forward -------------------------------------------------------------------------------

    def _branch_names(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def extra_repr(self) -> str:
        parts = [f"{n}: r={o.r}, s={self.scaling[n]:g}" for n, o in self.options.items()]
        return "; ".join(parts)


class LoraLinear(LoraLayer):
    """LoRA over ``nn.Linear`` (W is out×in), transformers ``Conv1D`` (W is in×out) or a
    bitsandbytes 4-bit ``Linear4bit`` (QLoRA: the frozen matmul runs through
    :func:`lorakit.adapters.quant.nf4_linear`). Each adapter's variant computes the output:
    plain LoRA adds ``s·B A x``, DoRA (``use_dora``) rescales the base output per row."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features, self.fan_in_fan_out = layout.features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, one per output feature (PEFT's name)
        self.lora_dora = nn.ModuleDict()  # DoRA's other state (dora.DoraState: c while merged, ‖W‖ cache)
        self.lora_initial = nn.ModuleDict()  # PiSSA's A₀, B₀ (pissa.StartingFactors), for pissa_to_lora
        self.fused = True  # False: always the plain module-by-module path (tests, debugging)

    @property
    def quantized(self) -> bool:
        return quant.is_quantized(self.base_layer)

    def _create(self, name: str, options: AdapterOptions) -> None:
        if options.use_dora and options.lora_bias:
            raise LorakitError("lora_bias cannot be combined with DoRA (use_dora), as in PEFT")
        self.lora_A[name] = nn.Linear(self.in_features, options.r, bias=False)
        self.lora_B[name] = nn.Linear(options.r, self.out_features, bias=options.lora_bias)
        self.lora_dropout[name] = nn.Dropout(options.dropout) if options.dropout > 0 else nn.Identity()

    def _init(self, name: str, init: bool | str) -> None:
        if init is False:
            return  # nn.Linear's own init for A and B: a non-zero update (tests, experiments)
        if pissa.is_pissa(init):
            return self._init_pissa(name, init)
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

    def _init_pissa(self, name: str, method: str) -> None:
        """PiSSA (:mod:`~lorakit.adapters.pissa`): A, B from W's principal part, the base becomes the
        residual, A₀ and B₀ are kept."""
        if self.quantized:
            raise LorakitError("pissa initialisation needs a dense base weight; quantise after initialising, "
                               "or use the default initialisation with QLoRA")
        stored, s = self.base_layer.weight, self.scaling[name]
        weight = layout.out_in(stored.detach().float(), self.fan_in_fan_out)  # (out, in)
        A, B = pissa.factors(weight, self.options[name].r, s, method)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
            stored.copy_(layout.out_in(pissa.residual(weight, A, B, s), self.fan_in_fan_out).to(stored.dtype))
        self.lora_initial[name] = pissa.StartingFactors(A, B)

    def pissa_as_lora(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """PiSSA adapter ``name`` as ``(A', B')`` of rank 2r for the untouched base (:func:`pissa.to_lora`)."""
        if name not in self.lora_initial:
            raise LorakitError(
                f"adapter {name!r}: the PiSSA starting values are not in memory (the adapter was loaded, not "
                "initialised here), so it cannot be converted to a plain LoRA; save it as PiSSA instead")
        start = self.lora_initial[name]
        return pissa.to_lora(self.lora_A[name].weight, self.lora_B[name].weight, start.A, start.B)

    def dense_weight(self) -> torch.Tensor:
        return quant.dequantize(self.base_layer) if self.quantized else self.base_layer.weight.float()

    def _densify(self) -> None:
        if self.quantized:
            quant.warn_dequantized()
            self.base_layer = quant.dense_copy(self.base_layer, torch.float32)

    def delta_weight(self, name: str) -> torch.Tensor:
        A, B = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return layout.out_in((B @ A) * self.scaling[name], self.fan_in_fan_out)  # (out, in) -> stored layout

    def delta_bias(self, name: str) -> torch.Tensor | None:
        bias = self.lora_B[name].bias
        return None if bias is None else bias.float() * self.scaling[name]

    # -- forward -------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._branch_names()
        if len(names) == 1:  # the usual case, training included
            name = names[0]
            if self._can_fuse(name, x):
                return self._fused_forward(name, x)
            return self.variants[name].forward(self, name, x)
        rescaling = [n for n in names if self.variants[n].rescales_base]
        if len(rescaling) > 1:
            raise LorakitError(f"DoRA adapters {rescaling} are active together; their magnitudes do not add — "
                               "activate one DoRA adapter at a time (or merge one first)")
        result = self.variants[rescaling[0]].forward(self, rescaling[0], x) if rescaling else self.base_forward(x)
        for name in names:  # none, or several active adapters: their updates add up
            if name not in rescaling:
                result = result + self.lora_branch(name, x).to(result.dtype)
        return result

    def base_forward(self, x: torch.Tensor, with_bias: bool = True) -> torch.Tensor:
        """The frozen layer's output (``x Wᵀ (+ b)``)."""
        if self.quantized:
            return quant.nf4_linear(x, self.base_layer, with_bias=with_bias)
        if with_bias:
            return self.base_layer(x)
        return layout.matmul(x, self.base_layer.weight, self.fan_in_fan_out)

    def lora_branch(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s · B A dropout(x)`` in the adapter's dtype (fp32 over a half-precision base)."""
        A, B = self.lora_A[name], self.lora_B[name]
        h = A(self.lora_dropout[name](x.to(A.weight.dtype)))  # (…, r): the rank-r path stays small
        return B(h) * self.scaling[name]

    def dropout_p(self, name: str) -> float:
        """The dropout probability adapter ``name`` applies now (0 in eval mode or without dropout)."""
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0

    def _can_fuse(self, name: str, x: torch.Tensor) -> bool:
        # The fused op covers the training case: one plain LoRA adapter over a frozen base.
        base = self.base_layer
        if self.quantized and (getattr(base, "compute_dtype", None) or x.dtype) != self._fused_dtype(x):
            return False  # a 4-bit base computing in another dtype than its input: the plain path casts
        return (self.fused and isinstance(self.variants[name], Lora) and self.lora_B[name].bias is None
                and not base.weight.requires_grad and x.is_floating_point()
                and isinstance(self.lora_dropout[name], (nn.Dropout, nn.Identity)))

    @staticmethod
    def _fused_dtype(x: torch.Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype

    def _fused_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """One adapter through :class:`lorakit.adapters.fused.LoraLinearFn` (same numbers as the plain path)."""
        weight, bias = self.base_layer.weight, getattr(self.base_layer, "bias", None)
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        p = self.dropout_p(name)
        device = x.device.type
        weight_fn = None
        if self.quantized:  # NF4: dequantised inside the op, in forward and again in backward
            weight, weight_fn = None, functools.partial(quant.dequantize, self.base_layer, self._fused_dtype(x))
        if torch.is_autocast_enabled(device):  # autocast would cast inside the op: cast once, here
            dtype = torch.get_autocast_dtype(device)
            x, A, B = x.to(dtype), A.to(dtype), B.to(dtype)
            weight = None if weight is None else weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        bias = None if bias is None else bias.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        with torch.autocast(device, enabled=False):
            y = fused.LoraLinearFn.apply(x2, weight, bias, A, B, self.scaling[name], p, self.fan_in_fan_out,
                                         weight_fn)
        return y.view(*x.shape[:-1], y.shape[-1])


class LoraEmbedding(LoraLayer):
    """LoRA over ``nn.Embedding``: ``E[ids] + s · (A[:, ids])ᵀ Bᵀ``, A (r×vocab), B (dim×r)."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def _create(self, name: str, options: AdapterOptions) -> None:
        if options.lora_bias:
            raise LorakitError("lora_bias is not supported on embedding layers (PEFT does not save it either)")
        if options.use_dora:
            raise LorakitError("DoRA on embedding layers is not supported by lorakit; target linear layers, "
                               "or use plain LoRA on the embedding")
        if pissa.is_pissa(options.init):
            raise LorakitError("pissa initialisation applies to linear layers, not embeddings")
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


def variant_for(options: AdapterOptions) -> Variant:
    """The variant an adapter with ``options`` runs as: DoRA or plain LoRA."""
    return DORA if options.use_dora else LORA


def wrap(module: nn.Module) -> LoraLayer:
    """The LoRA layer for ``module``: Linear, Conv1D or Embedding.

    Raises:
        LorakitError: the module is of another kind.
    """
    if is_linear(module):
        return LoraLinear(module)
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    raise LorakitError(
        f"LoRA supports nn.Linear, nn.Embedding and transformers Conv1D; got {type(module).__name__}"
    )


__all__ = ["AdapterOptions", "LoraEmbedding", "LoraLayer", "LoraLinear", "is_conv1d", "is_linear", "variant_for",
           "wrap"]
