"""What a setup trains on a model: adapted linear layers and parameters, or base weights.

Targets resolve on the meta model of the :class:`~lorakit.estimate.model_inventory.Inventory` exactly
as ``add_adapter`` resolves them (``inject.resolve_config``: name matching, PEFT's MoE rewrite of
``all-linear``), and the plan refuses what training refuses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.parameter import innermost
from lorakit.adapters.quant import experts_refusal
from lorakit.errors import LorakitError
from lorakit.estimate.model_inventory import Expert, Inventory, Linear
from lorakit.estimate.setup import Setup
from lorakit.inject import find_targets, resolve_config
from lorakit.spectrum import module_type


@dataclass(frozen=True)
class ParamTarget:
    """A parameter adapted directly: E experts (1 for a 2-D weight) of fan_in -> fan_out, rank r each."""

    name: str
    experts: int
    fan_in: int
    fan_out: int
    rank: int
    layer: int | None

    @property
    def adapter_params(self) -> int:
        return self.rank * self.experts * (self.fan_in + self.fan_out)


@dataclass(frozen=True)
class Trained:
    """What a setup trains on the model."""

    adapted: list[Linear]
    """Linear layers that carry an adapter (LoRA, QLoRA, DoRA)."""
    params: list[ParamTarget]
    """Parameters adapted directly (PEFT's ``target_parameters``: expert weights, routers)."""
    linears: set[str]
    """Names of the base linear layers trained themselves: all of them (full), Spectrum's selection."""
    embeddings: bool
    """The embeddings and the output head train (full; Spectrum unless told not to)."""


def what_trains(inv: Inventory, s: Setup) -> Trained:
    """What ``s`` trains on the model of ``inv``, resolved as training resolves it.

    Raises:
        LorakitError: training would refuse ``s`` on this model (QLoRA on expert weights, DoRA on
            target parameters, targets that match nothing).
    """
    if s.method == "qlora" and inv.experts:
        raise LorakitError(experts_refusal(inv.expert_params, inv.params))
    adapted, params = _adapted(inv, s)
    linears = {lin.name for lin in inv.linears} if s.method == "full" else set()
    if s.method == "spectrum":
        linears = {lin.name for lin in _spectrum_selection(inv, s.top)}
    embeddings = s.method == "full" or (s.method == "spectrum" and s.spectrum_embeddings)
    return Trained(adapted, params, linears, embeddings)


def _adapted(inv: Inventory, s: Setup) -> tuple[list[Linear], list[ParamTarget]]:
    """The linear layers and parameters a LoRA-family setup adapts, resolved on the meta model exactly
    as ``add_adapter`` resolves them (``inject.resolve_config``: name matching, PEFT's MoE rewrite)."""
    if s.method not in ("lora", "qlora", "dora"):
        return [], []
    if s.target_parameters and not inv.experts:
        raise LorakitError("--target-parameters: this model has no mixture-of-experts weights; name linear "
                           "layers with --targets")
    names = "all-linear" if s.targets == "all-linear" else [s.targets] if isinstance(s.targets, str) else list(s.targets)
    missing = _missing_targets(inv.model, names) if names != "all-linear" else []
    if missing:
        known = sorted({lin.name.rsplit(".", 1)[-1] for lin in inv.linears})
        raise LorakitError(f"--targets: {', '.join(missing)} match no linear layer; this model has {', '.join(known)}")
    config = LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=names,
                        target_parameters=list(s.target_parameters) or None)
    config, modules, params = resolve_config(inv.model, config)
    by_name = {lin.name: lin for lin in inv.linears}
    experts = {e.name: e for e in inv.experts}
    targets = []
    for module, param, key in params:
        kind = module_type(f"{key}")
        e = experts.get(key)
        if e is None:  # a 2-D weight (a router's): (out, in)
            out, fan_in = getattr(innermost(inv.model.get_submodule(module)), param).shape
            e = Expert(key, 1, int(fan_in), int(out), kind[1] if kind else None)
        targets.append(ParamTarget(key, e.experts, e.fan_in, e.fan_out, config.rank_for(key), e.layer))
    if s.method == "dora" and targets:
        raise LorakitError("--method dora: DoRA is not supported on target parameters (the experts), in lorakit or "
                           "PEFT; plan --method lora, or DoRA on --targets without expert weights")
    return [by_name[m] for m in modules if m in by_name], targets


def _missing_targets(model: Any, targets: list[str]) -> list[str]:
    """The names of ``targets`` that select no module of ``model``, matched as ``add_adapter`` matches them."""
    return [t for t in targets
            if not find_targets(model, LoraConfig(target_modules=[t]), strict=False, allow_empty=True)]


def _spectrum_selection(inv: Inventory, top: float) -> list[Linear]:
    # Which matrices win depends on the scan; how many per group does not (int(len·pct/100)).
    groups: dict[str, list[Linear]] = {}
    for lin in inv.linears:
        kind = module_type(f"{lin.name}.weight")
        if kind is not None:
            groups.setdefault(kind[0], []).append(lin)
    # Worst case for activations: each type's picks start where the previous type's ended, so the
    # selection touches as many distinct layers as it can.
    chosen: list[Linear] = []
    for j, members in enumerate(groups.values()):
        k = int(len(members) * top / 100)
        chosen += [members[(j * k + t) % len(members)] for t in range(k)]
    return chosen
