"""What a model is made of, read from its config alone: the model is built on the ``meta`` device
(no weights, no memory), so parameter counts and shapes are exact for any transformers architecture.

:func:`inventory` lists the linear layers (:class:`Linear`; the output head apart), the 3-D expert
weights of mixture-of-experts layers (:class:`Expert`), parameter counts by kind and the dimensions
the activations follow; the meta model stays on the :class:`Inventory` so that targets resolve on it
as training resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.adapters import experts as moe
from lorakit.errors import LorakitError
from lorakit.spectrum import module_type


@dataclass(frozen=True)
class Linear:
    """One linear layer of the model: full name, input and output features, layer index."""

    name: str
    fan_in: int
    fan_out: int
    layer: int | None


@dataclass(frozen=True)
class Expert:
    """One 3-D expert weight of a mixture-of-experts layer (E experts of fan_in -> fan_out each)."""

    name: str
    experts: int
    fan_in: int
    fan_out: int
    layer: int | None


@dataclass(frozen=True)
class Inventory:
    """What a config builds, counted on the meta device."""

    arch: str
    params: int
    """All parameters (tied weights once)."""
    embedding: int
    """Input embedding parameters."""
    head: int
    """Output head parameters not shared with the embedding (0 when tied)."""
    linears: tuple[Linear, ...]
    """Every Linear/Conv1D except the output head."""
    tensors: int
    """Number of parameter tensors."""
    buffer_bytes: int
    """Non-parameter tensors (rotary frequencies …), counted in fp32."""
    dims: dict[str, int] = field(default_factory=dict)
    """hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, gated (0/1); MoE models also
    experts (E), top_k, moe_intermediate."""
    experts: tuple[Expert, ...] = ()
    """The expert weights of mixture-of-experts layers (those transformers' experts interface serves)."""
    model: Any = field(default=None, compare=False, repr=False)
    """The model on the meta device (no memory), to resolve targets exactly as lorakit would."""

    @property
    def linear_params(self) -> int:
        return sum(lin.fan_in * lin.fan_out for lin in self.linears)

    @property
    def expert_params(self) -> int:
        return sum(e.experts * e.fan_in * e.fan_out for e in self.experts)

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: all but the experts it is not routed to."""
        if not self.experts:
            return self.params
        return self.params - self.expert_params + self.expert_params * self.dims["top_k"] // self.dims["experts"]

    @property
    def other(self) -> int:
        """Norms, biases, routers and anything else."""
        return self.params - self.embedding - self.head - self.linear_params - self.expert_params


def _dim(cfg: Any, *names: str, default: int | None = None) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    if default is None:
        raise LorakitError(f"model config ({type(cfg).__name__}) has none of {names}; cannot plan for it")
    return default


def inventory(config: Any) -> Inventory:
    """Count parameters by kind and list the linear layers, from a transformers config alone.

    Raises:
        LorakitError: transformers cannot build the architecture.
    """
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError) as err:
        raise LorakitError(f"cannot build {type(config).__name__} from its config to count parameters: {err}") from err
    params = {id(p): p for p in model.parameters()}
    emb = model.get_input_embeddings().weight
    out = getattr(model.get_output_embeddings(), "weight", None)
    head = 0 if out is None or out is emb else out.numel()
    linears: list[Linear] = []
    expert_weights: list[Expert] = []
    for name, mod in model.named_modules():
        if moe.is_interface_experts(mod):
            kind = module_type(f"{name}.weight")
            for weight in moe.weight_names(mod):
                e, a, b = getattr(mod, weight).shape
                fin, fout = (a, b) if mod.is_transposed else (b, a)
                expert_weights.append(Expert(f"{name}.{weight}", int(e), int(fin), int(fout), kind[1] if kind else None))
            continue
        if mod is model.get_output_embeddings():
            continue
        if isinstance(mod, torch.nn.Linear):
            fin, fout = mod.in_features, mod.out_features
        elif isinstance(mod, Conv1D):
            fin, fout = mod.weight.shape
        else:
            continue
        kind = module_type(f"{name}.weight")
        linears.append(Linear(name, int(fin), int(fout), kind[1] if kind else None))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h = _dim(text, "hidden_size", "n_embd", "d_model")
    heads = _dim(text, "num_attention_heads", "n_head")
    dims = {"hidden": h, "layers": _dim(text, "num_hidden_layers", "n_layer"), "heads": heads,
            "kv_heads": _dim(text, "num_key_value_heads", default=heads),
            "head_dim": _dim(text, "head_dim", default=h // heads), "vocab": emb.shape[0],
            "intermediate": _dim(text, "intermediate_size", "n_inner", default=4 * h),
            "gated": int(any("gate" in lin.name.rsplit(".", 1)[-1] for lin in linears))}
    if expert_weights:
        dims.update(experts=expert_weights[0].experts,
                    top_k=_dim(text, "num_experts_per_tok", "moe_topk", "top_k", default=1),
                    moe_intermediate=next((e.fan_in for e in expert_weights if e.name.endswith("down_proj")),
                                          expert_weights[-1].fan_in))
    buffers = 4 * sum(b.numel() for b in model.buffers())
    return Inventory(type(model).__name__, sum(p.numel() for p in params.values()), emb.numel(), head,
                     tuple(linears), len(params), buffers, dims, tuple(expert_weights), model)
