"""Batched multi-adapter LoRA on target parameters: MoE expert weights and 2-D weights (routers).

Each row of a batch (one request) names an adapter slot or none, as for
:class:`~lorakit.serve.layers.BatchedLoraLinear`; the same per-forward plan (:class:`LoraBatch`)
says which. What is notable:

- **Experts** (:class:`BatchedLoraExperts`, replacing an experts module that transformers' experts
  interface serves): the routed base computation runs once for the whole batch
  (:func:`lorakit.adapters.experts.experts_forward`); each adapter in use adds its rank-r terms on
  the (token, expert) pairs of its own rows only. Slots hold per-expert ``A`` (slots, E, R, in) and
  ``s·Bᵀ`` (slots, E, R, out), ranks zero-padded to R (exact).
- **A 2-D weight of any other module** (:class:`BatchedLoraParameter`, e.g. a router whose forward
  does more than a matmul): the module runs once for the rows without an adapter on this weight
  and once per adapter in use on that adapter's rows, with ``W + ΔW`` in place of the weight
  (``torch.func.functional_call``; ΔW is the one small matrix). Its outputs must have one row per
  token, which routers' outputs do.

Rows map to tokens as the MoE block flattens them: token ``t`` of a (B·T, H) input is row ``t // T``.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.adapters import experts
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.peft_format import module_scaling
from lorakit.errors import LorakitError
from lorakit.inject import resolve_config, set_submodule
from lorakit.serve.layers import LoraBatch, SlotContext


def _token_slots(plan: LoraBatch, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot of each token's row, whether that row has an adapter) for a flattened (rows·T) input."""
    if tokens % plan.rows:
        raise LorakitError(f"a batch of {plan.rows} rows reached an expert layer as {tokens} tokens; expected a "
                           "multiple of the rows (the MoE block flattens (rows, T, H) to (rows·T, H))")
    row = torch.arange(tokens, device=plan.row_slots.device) // (tokens // plan.rows)
    return plan.row_slots[row], plan.row_mask.view(-1)[row] > 0


class BatchedLoraExperts(nn.Module):
    """An experts module plus slot tables of per-expert LoRA factors for its two weights."""

    def __init__(self, base_layer: nn.Module, num_slots: int, max_rank: int, context: SlotContext,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.weight_names = experts.weight_names(base_layer)
        self.shapes: dict[str, tuple[int, int, int]] = {}  # weight -> (E, in, out)
        for name in self.weight_names:
            e, a, b = getattr(base_layer, name).shape
            fan_in, fan_out = (a, b) if base_layer.is_transposed else (b, a)
            self.shapes[name] = (e, fan_in, fan_out)
            device = getattr(base_layer, name).device
            self.register_buffer(f"A_{name}", torch.zeros(num_slots, e, max_rank, fan_in, dtype=dtype, device=device),
                                 persistent=False)
            self.register_buffer(f"Bt_{name}", torch.zeros(num_slots, e, max_rank, fan_out, dtype=dtype,
                                                           device=device), persistent=False)
        self.filled: dict[str, set[int]] = {name: set() for name in self.weight_names}

    @torch.no_grad()
    def write_slot(self, slot: int, name: str, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Put PEFT's stacked factors of weight ``name`` — A (r·E, in), B (out, r·E) — into ``slot``
        (None: this adapter leaves the weight alone)."""
        table_A, table_Bt = getattr(self, f"A_{name}"), getattr(self, f"Bt_{name}")
        table_A[slot].zero_()
        table_Bt[slot].zero_()
        self.filled[name].discard(slot)
        if A is None:
            return
        A_e, B_e = experts.expert_factors(A.float(), B.float(), self.shapes[name][0])  # (E, r, in), (E, out, r)
        r = A_e.shape[1]
        table_A[slot, :, :r].copy_(A_e)
        table_Bt[slot, :, :r].copy_((B_e * scaling).transpose(-2, -1))
        self.filled[name].add(slot)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                **kwargs) -> torch.Tensor:
        plan = self.context.plan
        used = [] if plan is None else [s for s in plan.slot_list if any(s in f for f in self.filled.values())]
        if not used:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, **kwargs)
        slot_of, has = _token_slots(plan, hidden_states.shape[0])
        updates: dict[str, list[experts.ExpertUpdate]] = {}
        for name in self.weight_names:
            A, Bt = getattr(self, f"A_{name}"), getattr(self, f"Bt_{name}")
            updates[name] = [
                experts.ExpertUpdate(A[slot, :, :plan.rank], Bt[slot, :, :plan.rank].transpose(-2, -1), 1.0,
                                     tokens=has & (slot_of == slot))
                for slot in used if slot in self.filled[name]]
        return experts.experts_forward(self.base_layer, hidden_states, top_k_index, top_k_weights,
                                       **{experts.UPDATES_KWARG: updates})

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: E={e}, in={i}, out={o}" for n, (e, i, o) in self.shapes.items())


class BatchedLoraParameter(nn.Module):
    """A module plus slot tables of LoRA factors on its 2-D weight ``parameter_name``."""

    def __init__(self, base_layer: nn.Module, parameter_name: str, num_slots: int, max_rank: int,
                 context: SlotContext, dtype: torch.dtype) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.parameter_name = parameter_name
        self.context = context
        weight = getattr(base_layer, parameter_name)
        self.out_features, self.in_features = weight.shape
        self.register_buffer("lora_A", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype,
                                                   device=weight.device), persistent=False)
        self.register_buffer("lora_Bt", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype,
                                                    device=weight.device), persistent=False)
        self.filled: set[int] = set()

    @torch.no_grad()
    def write_slot(self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scaling: float) -> None:
        """Put ``A`` (r, in) and ``s·B`` (out, r) into ``slot`` (None: this adapter skips the weight)."""
        self.lora_A[slot].zero_()
        self.lora_Bt[slot].zero_()
        self.filled.discard(slot)
        if A is None:
            return
        r = A.shape[0]
        self.lora_A[slot, :r].copy_(A)
        self.lora_Bt[slot, :r].copy_((B.float() * scaling).T)
        self.filled.add(slot)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        plan = self.context.plan
        used = [] if plan is None else [s for s in plan.slot_list if s in self.filled]
        if not used:
            return self.base_layer(hidden_states, *args, **kwargs)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # routers take (rows·T, H) or (rows, T, H)
        slot_of, has = _token_slots(plan, flat.shape[0])
        weight = getattr(self.base_layer, self.parameter_name)
        groups = [(None, ~has | ~torch.isin(slot_of, torch.tensor(used, device=slot_of.device)))]
        groups += [(slot, has & (slot_of == slot)) for slot in used]
        pieces = []
        for slot, mask in groups:
            rows = mask.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            if slot is None:
                out = self.base_layer(flat[rows], *args, **kwargs)
            else:
                delta = self.lora_Bt[slot, :plan.rank].T.float() @ self.lora_A[slot, :plan.rank].float()  # (out, in)
                out = torch.func.functional_call(self.base_layer, {self.parameter_name: weight + delta.to(weight.dtype)},
                                                 (flat[rows], *args), kwargs, strict=False)
            pieces.append((rows, out))
        out = _assemble(pieces, flat.shape[0])
        if isinstance(out, torch.Tensor) and hidden_states.dim() > 2:  # one tensor: back to the input's shape
            out = out.view(*hidden_states.shape[:-1], *out.shape[1:])
        return out

    def extra_repr(self) -> str:
        return f"{self.parameter_name}: in={self.in_features}, out={self.out_features}"


def _assemble(pieces: list[tuple[torch.Tensor, object]], tokens: int):
    """The module's outputs for all tokens from its outputs on groups of them (tensors, or tuples of
    tensors with one row per token)."""
    first = pieces[0][1]
    single = isinstance(first, torch.Tensor)
    parts = [(rows, (out,) if single else tuple(out)) for rows, out in pieces]
    merged = []
    for k, value in enumerate(parts[0][1]):
        if not isinstance(value, torch.Tensor) or value.shape[:1] != parts[0][0].shape:
            raise LorakitError("a module with LoRA on its weight returned something other than one row per token; "
                               "the engine cannot serve different adapters per request on it")
        full = value.new_empty((tokens, *value.shape[1:]))
        for rows, outs in parts:
            full[rows] = outs[k]
        merged.append(full)
    return merged[0] if single else tuple(merged)


def install_parameters(model: nn.Module, target_modules: list[str] | str, target_parameters: list[str] | None,
                       num_slots: int, max_rank: int, context: SlotContext,
                       dtype: torch.dtype | None) -> dict[str, tuple[nn.Module, str | None]]:
    """Replace, in place, every experts module (and each 2-D weight the targets select) by a batched
    layer. Returns parameter full name -> (layer, expert weight name, or None for a 2-D weight).

    The 2-D weights are those ``target_parameters`` names, or else those PEFT's MoE rule derives from
    ``target_modules`` (``all-linear`` on a Qwen3-MoE: each router's ``gate.weight``).
    """
    if target_parameters is None:
        _, _, parameters = resolve_config(model, LoraConfig(target_modules=target_modules), strict=False)
    else:
        _, _, parameters = resolve_config(model, LoraConfig(target_modules=[], target_parameters=target_parameters))
    installed: dict[str, tuple[nn.Module, str | None]] = {}
    for name, module in list(model.named_modules()):
        if experts.is_interface_experts(module):
            layer = BatchedLoraExperts(module, num_slots, max_rank, context,
                                       dtype or getattr(module, experts.weight_names(module)[0]).dtype)
            set_submodule(model, name, layer)
            installed.update({f"{name}.{w}": (layer, w) for w in layer.weight_names})
    for module_name, param, key in parameters:
        if key in installed:
            continue
        base = model.get_submodule(module_name)
        layer = BatchedLoraParameter(base, param, num_slots, max_rank, context, dtype or getattr(base, param).dtype)
        set_submodule(model, module_name, layer)
        installed[key] = (layer, None)
    return installed


def check_parameter(layers: dict[str, tuple[nn.Module, str | None]], key: str, module: str,
                    parts: dict[str, torch.Tensor], config, max_rank: int,
                    source) -> tuple[tuple[torch.Tensor, torch.Tensor, float, None], int]:
    """An adapter file's factors of target parameter ``key`` (file module ``module``), checked against
    the engine's layer: ``((A, B, scaling, None), rank per expert)``.

    Raises:
        LorakitError: the engine does not serve the parameter, the shapes or rank do not fit, or the
            factors hold NaN/inf.
    """
    if set(parts) != {"lora_A", "lora_B"}:
        raise LorakitError(f"{source}: {module} ({key}) must hold lora_A.weight and lora_B.weight only")
    if key not in layers:
        raise LorakitError(f"{source}: adapts parameter {key!r}, which this engine does not serve; start the engine "
                           "with target_parameters naming it")
    layer, weight = layers[key]
    count, fan_in, fan_out = layer.shapes[weight] if weight else (1, layer.in_features, layer.out_features)
    A, B = parts["lora_A"], parts["lora_B"]
    r = config.rank_for(key)
    if tuple(A.shape) != (r * count, fan_in) or tuple(B.shape) != (fan_out, r * count):
        raise LorakitError(f"{source}: {key}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit rank {r} "
                           f"on {count} expert(s) of {fan_in} inputs and {fan_out} outputs; the adapter was trained on "
                           "a different base model (or its rank_pattern does not match its tensors)")
    if r > max_rank:
        raise LorakitError(f"{source}: {key} has rank {r}, above this engine's max_rank {max_rank}; start the engine "
                           f"with max_rank >= {r}")
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise LorakitError(f"{source}: {key} holds NaN or inf values")
    return (A.float(), B.float(), module_scaling(config, key), None), r
