"""Combine several LoRA adapters into one, computed on the weight updates ΔW.

For every adapted module, adapter i contributes ``ΔWᵢ = sᵢ · Bᵢ Aᵢ`` (its own scaling: alpha/r,
or alpha/√r with rsLoRA; its own rank, per-module rank/alpha patterns included). The methods::

    cat              A = [A₁; A₂; …], B = [w₁s₁B₁, w₂s₂B₂, …]       exact, r = Σ rᵢ, no SVD
    linear           Σ wᵢ ΔWᵢ, refactored by SVD at rank K          exact by default (K = Σ rᵢ)
    svd              Σ wᵢ ΔWᵢ, best rank-K approximation            K defaults to max rᵢ
    magnitude_prune  Σ wᵢ trim(ΔWᵢ)                                  then rank K by SVD
    ties             trim, elect sign by Σ wᵢ trim(ΔWᵢ), weighted mean of agreeing entries
    dare_linear      Σ wᵢ dare(ΔWᵢ)
    dare_ties        dare each ΔWᵢ, then TIES's sign election and weighted mean

``trim`` keeps the ``round(density · numel)`` largest magnitudes of a matrix (TIES, Yadav et al.
2023, §3); ``dare`` keeps each entry with probability ``density`` and divides by it (DARE, Yu et
al. 2023). The TIES mean is weighted: ``Σ_agree wᵢ τᵢ / Σ_agree wᵢ`` per entry, so weights set each
adapter's share (scaling all weights changes nothing); entries whose elected sign no adapter
shares are 0. DARE masks come from a generator seeded by ``(seed, module name)``: the same call
gives the same adapter, whichever order modules are visited in.

What is notable:

- The result is a plain PEFT adapter with scaling 1 everywhere: ``lora_alpha == r`` (and
  ``alpha_pattern == rank_pattern`` where ranks differ), so ``B A`` *is* the combined ΔW. vLLM
  and LoRAX, which read one global ``alpha/r``, compute the same update as PEFT.
- Linear-algebra shortcuts keep it exact and cheap: ``linear`` and ``svd`` never build the
  (out × in) matrix; the SVD of ``B_cat A_cat`` comes from two thin QRs and an (R × R) SVD.
- PEFT's own non-SVD ``linear``/``ties``/``dare`` mix A's and B's separately (``B A`` then holds
  cross terms ``Bᵢ Aⱼ``) and its rsLoRA result is √r too strong; everything here is on ΔW.
- Adapters may target different modules (a module an adapter lacks counts as ΔW = 0), except for
  ``linear``, which asks for identical targets so that a typo'd adapter is not silently half-used.
- Mixture-of-experts expert weights (``target_parameters``): each expert's updates combine on
  their own, with one rank for all experts, and go back into PEFT's layout; cat, linear and svd
  only (the others would form every expert's full ΔW).
- Refused with a clear message: DoRA adapters, ``modules_to_save``, trained base biases.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit._fs import atomic_folder
from lorakit.adapters.config import CONFIG_NAME, LoraConfig
from lorakit.adapters.lora import LoraEmbedding, LoraLinear
from lorakit.adapters.parameter import LoraParameter
from lorakit.adapters.peft_format import WEIGHTS_NAME, Factors, nest_module, part_file_key, read_factors
from lorakit.errors import LorakitError
from lorakit.inject import adapter_configs, add_adapter, check_adapter_name, named_adapter_layers

COMBINE_METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
DEFAULT_DENSITY = 0.5


@dataclass
class Combined:
    """The combined update of one module, scaling 1: ``ΔW = B @ A`` (+ ``bias``)."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None
    embedding: bool
    kept_energy: float  # ‖kept‖²/‖full‖² of the rank-K refactoring (1.0 when exact; experts: the least)
    experts: int = 1
    parameter: str | None = None

    @property
    def rank(self) -> int:
        return self.A.shape[0] // self.experts


# -- the math, per module ----------------------------------------------------------------------


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``round(density · numel)`` entries of largest magnitude, zero the rest."""
    k = int(density * delta.numel() + 0.5)
    if k >= delta.numel():
        return delta.clone()
    out = torch.zeros_like(delta)
    if k > 0:
        flat = delta.flatten()
        top = flat.abs().topk(k).indices
        out.view(-1)[top] = flat[top]
    return out


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``1 - density``, rescale the survivors by ``1/density``."""
    keep = torch.rand(delta.shape, generator=generator, dtype=torch.float64) < density
    return torch.where(keep, delta / density, torch.zeros_like(delta))


def ties_merge(deltas: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Sign election by weighted total mass, then the weighted mean of the agreeing entries."""
    stacked = torch.stack(list(deltas))  # (n, out, in)
    w = torch.tensor(list(weights), dtype=stacked.dtype).view(-1, 1, 1)
    elected = torch.sign((w * stacked).sum(0))  # (out, in): +1, -1, or 0 when nothing is left
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    numerator = (w * stacked * agree).sum(0)
    denominator = (w * agree).sum(0)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), torch.zeros_like(numerator))


def module_generator(seed: int, module: str) -> torch.Generator:
    """The DARE generator of ``module``: depends on the seed and the module's name only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % (2**63))


def combine_module(name: str, parts: Sequence[Factors | None], weights: Sequence[float], method: str,
                   rank: int | None = None, density: float | None = None, seed: int = 0) -> Combined:
    """Combine the updates of one module (``None`` where an adapter does not adapt it).

    Args:
        name: the module's name (seeds DARE; names errors).
        parts: one entry per adapter.
        weights: one per adapter.
        method: one of :data:`COMBINE_METHODS`.
        rank: K for the SVD refactoring (``cat`` ignores it); None = the method's default.
        density: share of entries kept by ``trim``/``dare``.
        seed: DARE's seed.

    Returns:
        Factors with scaling 1 whose product is the combined ΔW (in PEFT's layout).
    """
    present = [(p, w) for p, w in zip(parts, weights) if p is not None]
    if present[0][0].experts > 1:
        return _combine_experts(name, present, method, rank)
    embedding = present[0][0].embedding
    bias = _combined_bias(present)
    if method == "cat":
        A = torch.cat([p.A.double() for p, _ in present])  # (Σr, in)
        B = torch.cat([p.B.double() * (w * p.scale) for p, w in present], dim=1)  # (out, Σr)
        return Combined(A, B, bias, embedding, 1.0, parameter=present[0][0].parameter)
    total_rank = sum(p.rank for p, _ in present)
    if rank is None:
        rank = total_rank if method == "linear" else max(p.rank for p, _ in present)
    if method in ("linear", "svd"):
        U, S, Vh = _lowrank_svd(present)
    else:
        U, S, Vh = torch.linalg.svd(_full_combination(name, present, method, density, seed), full_matrices=False)
    k = min(rank, S.numel())
    energy = float((S**2).sum())
    kept = float((S[:k] ** 2).sum()) / energy if energy > 0 else 1.0
    root = S[:k].sqrt()
    # √S on each side: both factors of similar size, which suits further training.
    return Combined(root[:, None] * Vh[:k], U[:, :k] * root, bias, embedding, kept, parameter=present[0][0].parameter)


def _combine_experts(name: str, present: list[tuple[Factors, float]], method: str, rank: int | None) -> Combined:
    """Expert weights: each expert's updates combined on their own (the same rank K for all), then
    stacked back into PEFT's layout — A (K·E, in) expert-major, B (out, K·E) rank-major."""
    if method not in ("cat", "linear", "svd"):
        raise LorakitError(f"{name}: {method} on expert weights would form every expert's full ΔW; combine "
                           "adapters with expert LoRA by cat, linear or svd")
    experts = present[0][0].experts
    if any(p.experts != experts for p, _ in present):
        raise LorakitError(f"{name}: the adapters have different numbers of experts; they belong to different bases")
    weights = [w for _, w in present]
    per_expert = [combine_module(name, [p.expert(e) for p, _ in present], weights, method, rank)
                  for e in range(experts)]
    A = torch.cat([c.A for c in per_expert])  # (E·K, in)
    B = torch.stack([c.B for c in per_expert], dim=-1).flatten(1)  # (out, K, E) -> (out, K·E)
    return Combined(A, B, None, False, min(c.kept_energy for c in per_expert), experts, present[0][0].parameter)


def _combined_bias(present: list[tuple[Factors, float]]) -> torch.Tensor | None:
    biases = [(p.bias.double() * p.scale * w) for p, w in present if p.bias is not None]
    return torch.stack(biases).sum(0) if biases else None


def _lowrank_svd(present: list[tuple[Factors, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``Σ wᵢ sᵢ Bᵢ Aᵢ = B_cat A_cat`` without forming it: two thin QRs and a small SVD."""
    A = torch.cat([p.A.double() for p, _ in present])  # (R, in)
    B = torch.cat([p.B.double() * (w * p.scale) for p, w in present], dim=1)  # (out, R)
    Qb, Rb = torch.linalg.qr(B)  # (out, kb), (kb, R)
    Qa, Ra = torch.linalg.qr(A.T)  # (in, ka), (ka, R)
    u, S, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)  # (kb, ka) core
    return Qb @ u, S, vh @ Qa.T


def _full_combination(name: str, present: list[tuple[Factors, float]], method: str,
                      density: float | None, seed: int) -> torch.Tensor:
    density = DEFAULT_DENSITY if density is None else density
    deltas = [p.delta() for p, _ in present]
    weights = [w for _, w in present]
    if method == "magnitude_prune":
        return sum(w * trim(d, density) for d, w in zip(deltas, weights))
    if method == "ties":
        return ties_merge([trim(d, density) for d in deltas], weights)
    generator = module_generator(seed, name)
    dropped = [dare(d, density, generator) for d in deltas]
    if method == "dare_linear":
        return sum(w * d for d, w in zip(dropped, weights))
    if method == "dare_ties":
        return ties_merge(dropped, weights)
    raise LorakitError(f"unknown combination method {method!r}; choose one of {', '.join(COMBINE_METHODS)}")


# -- whole adapters ------------------------------------------------------------------------------


@dataclass
class CombineResult:
    """The combined adapter: its config, its tensors under PEFT's file keys, and how exact it is."""

    config: LoraConfig
    modules: dict[str, Combined]
    min_kept_energy: float
    mean_kept_energy: float

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """``adapter_model.safetensors`` content (fp32, contiguous)."""
        out = {}
        for name, c in self.modules.items():
            a, b = ("lora_embedding_A", "lora_embedding_B") if c.embedding else ("lora_A", "lora_B")
            out[part_file_key(name, a)] = c.A.float().contiguous()
            out[part_file_key(name, b)] = c.B.float().contiguous()
            if self.config.lora_bias and not c.embedding:
                bias = c.bias if c.bias is not None else torch.zeros(c.B.shape[0])
                out[part_file_key(name, "lora_B.bias")] = bias.float().contiguous()
        return out


def combine(adapters: Sequence[tuple[LoraConfig, dict[str, Factors]]], weights: Sequence[float] | None = None,
            method: str = "cat", rank: int | None = None, density: float | None = None, seed: int = 0,
            labels: Sequence[str] | None = None) -> CombineResult:
    """Combine adapters given as (config, factors by module name).

    Args:
        adapters: each adapter's config and its per-module :class:`Factors`.
        weights: one per adapter (default 1.0 each).
        method: one of :data:`COMBINE_METHODS`.
        rank: K of the SVD refactoring; None = exact for ``linear`` (Σ rᵢ) and max rᵢ otherwise.
            Not allowed with ``cat`` (its rank is Σ rᵢ).
        density: share kept by ``trim``/``dare`` (methods in :data:`NEEDS_DENSITY`; default 0.5).
        seed: DARE's seed.
        labels: names of the adapters for messages (folders or adapter names).

    Returns:
        The combined adapter.

    Raises:
        LorakitError: bad method/weights/rank/density, adapters for different bases, an unsupported
            adapter kind, or mismatched targets for ``linear``.
    """
    labels = list(labels) if labels is not None else [f"adapter {i + 1}" for i in range(len(adapters))]
    weights = _check_arguments(len(adapters), weights, method, rank, density)
    configs = [c for c, _ in adapters]
    parts = [p for _, p in adapters]
    _check_adapters(configs, parts, labels, method)
    order = _module_order(parts)
    modules = {}
    for name in order:
        modules[name] = combine_module(name, [p.get(name) for p in parts], weights, method, rank, density, seed)
    energies = [c.kept_energy for c in modules.values()]
    config = _combined_config(configs, parts, modules)
    return CombineResult(config, modules, min(energies), sum(energies) / len(energies))


def _check_arguments(count: int, weights: Sequence[float] | None, method: str, rank: int | None,
                     density: float | None) -> list[float]:
    if count < 1:
        raise LorakitError("combine needs at least one adapter")
    if method not in COMBINE_METHODS:
        raise LorakitError(f"unknown combination method {method!r}; choose one of {', '.join(COMBINE_METHODS)}")
    weights = [1.0] * count if weights is None else [float(w) for w in weights]
    if len(weights) != count:
        raise LorakitError(f"{count} adapter(s) but {len(weights)} weight(s); give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise LorakitError(f"weights must be finite numbers, got {weights}")
    if method in ("ties", "dare_ties") and not all(w > 0 for w in weights):
        raise LorakitError(f"{method} takes a weighted mean of agreeing entries: weights must be > 0, got {weights}")
    if rank is not None:
        if method == "cat":
            raise LorakitError("cat is exact with rank = the sum of the adapters' ranks; to compress, use "
                               "--method svd --rank K")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LorakitError(f"rank must be an integer >= 1, got {rank!r}")
    if density is not None:
        if method not in NEEDS_DENSITY:
            raise LorakitError(f"density only applies to {', '.join(NEEDS_DENSITY)}, not {method}")
        if not 0.0 < density <= 1.0:
            raise LorakitError(f"density is the share of entries kept: it must lie in (0, 1], got {density}")
    return weights


def _check_adapters(configs: list[LoraConfig], parts: list[dict[str, Factors]], labels: list[str], method: str) -> None:
    for config, label in zip(configs, labels):
        if config.use_dora:
            raise LorakitError(f"{label}: a DoRA adapter; its update depends on the base weight's norms and "
                               "cannot be combined on ΔW alone — merge it into the base instead")
        if config.modules_to_save:
            raise LorakitError(f"{label}: has modules_to_save ({', '.join(config.modules_to_save)}), fully "
                               "trained modules that have no low-rank ΔW to combine")
        if config.bias != "none":
            raise LorakitError(f"{label}: trains base biases (bias={config.bias!r}), which combine cannot carry")
        if config.lora_bias and method not in ("cat", "linear", "svd"):
            raise LorakitError(f"{label}: has lora_bias; only cat, linear and svd combine biases (linearly)")
    bases = {c.base_model_name_or_path for c in configs if c.base_model_name_or_path}
    if len(bases) > 1:
        listing = "; ".join(f"{label}: {c.base_model_name_or_path}" for c, label in zip(configs, labels))
        raise LorakitError(f"the adapters were trained on different base models ({listing}); adapters can "
                           "only be combined for the same base")
    seen: dict[str, tuple[tuple[int, int], str]] = {}
    for factors, label in zip(parts, labels):
        if not factors:
            raise LorakitError(f"{label}: holds no LoRA tensors")
        for name, f in factors.items():
            shape = (f.B.shape[0], f.A.shape[1])
            if name in seen and seen[name][0] != shape:
                raise LorakitError(f"module {name} is {seen[name][0][0]}x{seen[name][0][1]} in {seen[name][1]} but "
                                   f"{shape[0]}x{shape[1]} in {label}: the adapters belong to different base models")
            seen.setdefault(name, (shape, label))
    if method == "linear":
        union = set(seen)
        for factors, label in zip(parts, labels):
            lacking = sorted(union - set(factors))
            if lacking:
                raise LorakitError(f"linear needs every adapter to adapt the same modules, but {label} does not "
                                   f"adapt {len(lacking)} of them (e.g. {', '.join(lacking[:3])}); use cat (exact) "
                                   "or svd, which treat a missing module as ΔW = 0")


def _module_order(parts: list[dict[str, Factors]]) -> list[str]:
    order: list[str] = []
    seen: set[str] = set()
    for factors in parts:
        for name in factors:
            if name not in seen:
                seen.add(name)
                order.append(name)
    return order


def _combined_config(configs: list[LoraConfig], parts: list[dict[str, Factors]],
                     modules: dict[str, Combined]) -> LoraConfig:
    ranks = {c.parameter or name: c.rank for name, c in modules.items()}  # parameters: their patterns apply
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {name: rk for name, rk in ranks.items() if rk != r}
    first = configs[0]
    same_targets = all(set(p) == set(modules) for p in parts) and all(
        (c.target_modules, c.exclude_modules, c.layers_to_transform, c.layers_pattern, c.target_parameters)
        == (first.target_modules, first.exclude_modules, first.layers_to_transform, first.layers_pattern,
            first.target_parameters) for c in configs)
    parameters = [c.parameter for c in modules.values() if c.parameter]
    selection = dict(target_modules=first.target_modules, exclude_modules=first.exclude_modules,
                     layers_to_transform=first.layers_to_transform, layers_pattern=first.layers_pattern,
                     target_parameters=first.target_parameters) \
        if same_targets else dict(target_modules=[n for n, c in modules.items() if not c.parameter],
                                  target_parameters=parameters or None)
    return LoraConfig(
        r=r, lora_alpha=r, rank_pattern=pattern, alpha_pattern=dict(pattern), use_rslora=False,
        lora_dropout=first.lora_dropout, fan_in_fan_out=first.fan_in_fan_out, task_type=first.task_type,
        lora_bias=any(c.lora_bias for c in configs), init_lora_weights=True,
        base_model_name_or_path=first.base_model_name_or_path, **selection,
    )


# -- from folders, and on a loaded model ---------------------------------------------------------


def model_factors(model: nn.Module, name: str) -> tuple[LoraConfig, dict[str, Factors]]:
    """Adapter ``name``'s config and per-module factors, read off a model's LoRA layers."""

    configs = adapter_configs(model)
    if name not in configs:
        raise LorakitError(f"no adapter named {name!r} (loaded: {', '.join(configs) or 'none'})")
    factors = {}
    for module, layer in named_adapter_layers(model):
        if isinstance(layer, LoraParameter) and name in layer.lora_A:
            parameter = f"{nest_module(module)}.{layer.parameter_name}"
            factors[module] = Factors(layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach(),
                                      layer.scaling[name], experts=layer.num_experts, parameter=parameter)
        elif isinstance(layer, LoraLinear) and name in layer.lora_A:
            B = layer.lora_B[name]
            bias = None if B.bias is None else B.bias.detach()
            factors[module] = Factors(layer.lora_A[name].weight.detach(), B.weight.detach(), layer.scaling[name], bias)
        elif isinstance(layer, LoraEmbedding) and name in layer.lora_embedding_A:
            factors[module] = Factors(layer.lora_embedding_A[name].detach(), layer.lora_embedding_B[name].detach(),
                                      layer.scaling[name], None, embedding=True)
    return configs[name], factors


def combine_adapters(model: nn.Module, names: Sequence[str], new_name: str, weights: Sequence[float] | None = None,
                     method: str = "cat", rank: int | None = None, density: float | None = None, seed: int = 0,
                     activate: bool = False) -> CombineResult:
    """Combine adapters loaded on ``model`` into a new adapter ``new_name`` on the same model.

    Args:
        model: a model with the adapters loaded (``load_adapter(..., name=...)``).
        names: the adapters to combine; they stay as they are.
        new_name: the new adapter's name.
        weights, method, rank, density, seed: as :func:`combine`.
        activate: make the new adapter the only active one.

    Returns:
        The combination (its ``config`` is the new adapter's).

    Raises:
        LorakitError: as :func:`combine`, or ``new_name`` exists.
    """
    check_adapter_name(new_name)
    if new_name in adapter_configs(model):
        raise LorakitError(f"adapter {new_name!r} already exists; pick another name or delete it first")
    result = combine([model_factors(model, n) for n in names], weights, method, rank, density, seed, labels=list(names))
    config = result.config
    config.inference_mode = True
    add_adapter(model, config, new_name, activate=activate, strict_targets=False)
    layers = dict(named_adapter_layers(model))
    with torch.no_grad():
        for module, c in result.modules.items():
            layer = layers[module]
            if c.embedding:
                layer.lora_embedding_A[new_name].copy_(c.A)
                layer.lora_embedding_B[new_name].copy_(c.B)
                continue
            layer.lora_A[new_name].weight.copy_(c.A)
            layer.lora_B[new_name].weight.copy_(c.B)
            if layer.lora_B[new_name].bias is not None:
                layer.lora_B[new_name].bias.copy_(c.bias if c.bias is not None else 0.0)
    return result


def combine_folders(folders: Sequence[str | Path], out: str | Path, weights: Sequence[float] | None = None,
                    method: str = "cat", rank: int | None = None, density: float | None = None, seed: int = 0,
                    overwrite: bool = False) -> CombineResult:
    """Combine PEFT adapter folders into a new adapter folder ``out``, without a base model.

    The folder is written under a temporary name beside ``out`` and renamed when complete, so
    ``out`` never holds a half-written adapter.

    Raises:
        LorakitError: as :func:`combine`; a missing or unreadable folder; ``out`` exists (unless
            ``overwrite``).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")
    adapters = [read_factors(f) for f in folders]
    result = combine(adapters, weights, method, rank, density, seed, labels=[str(f) for f in folders])
    with atomic_folder(out) as tmp:
        save_file(result.file_tensors(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(result.config.to_json())
    return result
