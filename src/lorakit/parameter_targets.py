"""Which parameters an adapter targets: PEFT's ``target_parameters``, and PEFT's MoE target rewrite.

Two rules, both PEFT 0.21.2's, so that a config selects the same tensors here and in PEFT:

- **Matching** (:func:`find_parameters`): a target is a parameter's full name (``module.param``)
  or a dotted suffix of it (``mlp.experts.gate_up_proj``, ``gate.weight``). Parameters of one
  module nest in the module's own parameter order, the first innermost (that fixes the saved
  keys). ``layers_to_transform`` and ``exclude_modules`` do not apply (PEFT ignores them there);
  we are stricter in one way: every listed target must match some parameter.
- **The MoE rewrite** (:func:`convert_moe_targets`): on model types whose MoE layers transformers
  5 converts from the transformers 4 layout (per-expert ``nn.Linear`` → fused 3-D parameters;
  the Qwen2-MoE family — Qwen3-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE, … — and the Mixtral family),
  PEFT rewrites ``target_modules`` before matching: ``all-linear`` and regexes become the leaf
  names they select; the v4 names of the experts and router (``gate``, ``gate_proj``, ``up_proj``,
  ``down_proj``; ``gate``, ``w1``, ``w3``, ``w2``) become ``target_parameters``
  (``gate.weight``, ``gate_up_proj``, ``down_proj``), and when both halves of the fused
  ``gate_up_proj`` are named, its rank and alpha double (``rank_pattern``/``alpha_pattern``).
  That is why ``all-linear`` trains the experts and the router of a Qwen3-MoE, but not of a
  Qwen2-MoE or a gpt-oss (PEFT leaves those alone). A Linear module whose leaf name is one of the
  v4 names (a shared expert's ``gate_proj``) cannot be targeted on those model types — PEFT's
  rule, kept so that PEFT loads what we save.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

from torch import nn

from lorakit.adapters import experts
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.parameter import LoraParameter, check_options, check_target, innermost, wrappers
from lorakit.adapters.peft_format import nest_module
from lorakit.errors import LorakitError

# PEFT 0.21.2 (peft/utils/transformers_weight_conversion.py): v4 module name -> v5 parameter, and
# the fused v5 parameters with the v4 names they fuse.
_MOE_NAMES = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    "qwen2_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
_MOE_FUSED = {"mixtral": {"gate_up_proj": ("w1", "w3")}, "qwen2_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}


# -- the MoE rewrite -----------------------------------------------------------------------------


def moe_family(model: nn.Module) -> str | None:
    """``"qwen2_moe"`` or ``"mixtral"`` when PEFT rewrites this model's targets, else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        return None
    from transformers import conversion_mapping

    if conversion_mapping.get_checkpoint_conversion_mapping(model_type) is None:
        return None
    patterns = {**getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", {}), "mixtral": "mixtral"}
    family = patterns.get(model_type)
    return family if family in _MOE_NAMES else None


def convert_moe_targets(model: nn.Module, config: LoraConfig, linear_names: list[str] | None = None) -> LoraConfig:
    """``config`` with PEFT's MoE rewrite applied (a new config; unchanged where PEFT changes nothing).

    Args:
        model: the model the adapter goes on.
        config: the requested config.
        linear_names: what ``all-linear`` selects on ``model`` (module names), when it is asked for.

    Raises:
        LorakitError: only one half of a fused expert weight is named (``gate_proj`` without ``up_proj``).
    """
    family = moe_family(model)
    if family is None or not config.target_modules:
        return config
    mapping, fused = _MOE_NAMES[family], _MOE_FUSED[family]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = _resolve_string(model, config, mapping, linear_names or [])
        if not targets:
            return config
    parameters = set(config.target_parameters or [])
    remaining, named = set(), {new: set() for new in fused}
    for target in targets:
        old = next((o for o in mapping if target == o or target.endswith("." + o)), None)
        if old is None:
            remaining.add(target)
            continue
        parameters.add(mapping[old])
        if mapping[old] in fused:
            named[mapping[old]].add(old)
    rank_pattern, alpha_pattern = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, halves in fused.items():
        present = named[new]
        if 0 < len(present) < len(halves):
            missing = sorted(set(halves) - present)
            raise LorakitError(
                f"target_modules names {', '.join(sorted(present))} but not {', '.join(missing)}: on this model "
                f"they are one fused parameter, {new}, so target both or neither (as PEFT requires)")
        if len(present) == len(halves) > 1:
            key = rf".*\.{re.escape(new)}"
            rank_pattern[key] = config.r * len(halves)
            alpha_pattern[key] = config.lora_alpha * len(halves)
    return dataclasses.replace(config, target_modules=sorted(remaining), target_parameters=sorted(parameters),
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _resolve_string(model: nn.Module, config: LoraConfig, mapping: dict[str, str], linear_names: list[str]) -> set[str]:
    # all-linear: the leaf names of what it selects, plus every v4 name (PEFT adds them all).
    if config.target_modules == "all-linear":
        return {n.rsplit(".", 1)[-1] for n in linear_names} | set(mapping)
    regex = config.target_modules
    module_keys = [n for n, _ in model.named_modules()]
    param_keys = [n for n, _ in model.named_parameters()]
    matched = {k.rsplit(".", 1)[-1] for k in module_keys + param_keys if re.fullmatch(regex, k)}
    containers: dict[str, set[str]] = {}
    for key in param_keys:
        container, _, leaf = key.rpartition(".")
        containers.setdefault(leaf, set()).add(container)
    for old, new in mapping.items():  # v4 expert names inside a fused parameter's container
        if old not in matched and any(re.fullmatch(regex, f"{c}.{old}") for c in containers.get(new, ())):
            matched.add(old)
    return matched


# -- matching ------------------------------------------------------------------------------------


def find_parameters(model: nn.Module, config: LoraConfig, strict: bool = True) -> list[tuple[str, str, str]]:
    """``(module name, parameter name, full key)`` of every parameter ``config.target_parameters``
    selects, in model order; a module's parameters in its own order (the first is wrapped innermost).

    Raises:
        LorakitError: a listed target matches no parameter (with ``strict``), or a parameter of the
            model's top-level module is targeted.
    """
    targets = config.target_parameters or []
    if not targets:
        return []
    found, hit = [], set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraParameter) or _is_wrapper_part(module_name):
            continue  # the parameters sit on the innermost module, reached by its own name below
        outer = _outer_name(module_name)
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{outer}.{param_name}" if outer else param_name
            matching = [t for t in targets if key == t or key.endswith("." + t)]
            if not matching:
                continue
            if not outer:
                raise LorakitError(f"target parameter {key!r} belongs to the top-level module; only parameters of "
                                   "submodules can be targeted")
            hit.update(matching)
            found.append((outer, param_name, key))
    missing = [t for t in targets if t not in hit]
    if strict and missing:
        keys = [n for n, _ in model.named_parameters()]
        close = difflib.get_close_matches(missing[0], [k.split(".", 3)[-1] for k in keys], n=4, cutoff=0.4)
        raise LorakitError(f"target parameter {missing[0]!r} matches no parameter of the model"
                           + (f"; closest: {', '.join(close)}" if close else ""))
    return found


def _is_wrapper_part(name: str) -> bool:
    return bool(re.search(r"(^|\.)(lora_[A-Za-z_]+|modules_to_save|original_module)(\.|$)", name))


def _outer_name(module_name: str) -> str:
    """The name under which ``module_name``'s module sits in the model (``….experts`` for
    ``….experts.base_layer.base_layer``: where a further wrapper goes)."""
    return nest_module(module_name)


def check_parameters(model: nn.Module, parameters: list[tuple[str, str, str]], options,
                     modules: list[str] = ()) -> None:
    """Raise, before anything changes, if a targeted parameter cannot carry LoRA with its options
    (``options(key)``) or sits on a module that ``target_modules`` adapts too (``modules``)."""
    for module_name, param_name, key in parameters:
        module = model.get_submodule(module_name)
        if module_name in modules or isinstance(innermost(module), LoraLayer) or (
                isinstance(module, LoraLayer) and not isinstance(module, LoraParameter)):
            raise LorakitError(f"{module_name}: parameter {param_name!r} is targeted by target_parameters but the "
                               "module is also targeted by target_modules; target it one way only (as PEFT requires)")
        check_target(innermost(module), param_name)
        check_options(options(key), param_name)


def ensure_parameter_layer(model: nn.Module, module_name: str, param_name: str) -> LoraParameter:
    """The :class:`LoraParameter` for ``param_name`` at ``module_name`` (created as the new outermost
    wrapper if there is none yet)."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    module = getattr(parent, child)
    layer = module
    while isinstance(layer, LoraParameter):
        if layer.parameter_name == param_name:
            return layer
        layer = layer.base_layer
    if isinstance(layer, LoraLayer):
        raise LorakitError(f"{module_name}: parameter {param_name!r} is targeted by target_parameters but the module is "
                           "also targeted by target_modules; target it one way only (as PEFT requires)")
    wrapper = LoraParameter(module, param_name)
    setattr(parent, child, wrapper)
    return wrapper


def check_same_parameters(configs: dict[str, LoraConfig], config: LoraConfig, name: str) -> None:
    """PEFT's rule: every adapter of a model that uses ``target_parameters`` targets the same ones."""
    if not config.target_parameters:
        return
    for other, existing in configs.items():
        if existing.target_parameters and set(existing.target_parameters) != set(config.target_parameters):
            raise LorakitError(
                f"adapter {name!r} targets parameters {config.target_parameters} but adapter {other!r} targets "
                f"{existing.target_parameters}; all adapters of a model that use target_parameters must target the "
                "same ones (as in PEFT)")


def release_experts(model: nn.Module, removed: list[nn.Module]) -> None:
    """After ``removed`` wrappers left the model: give every experts config that no wrapper uses any
    more its experts implementation back."""
    still = {id(innermost(m).config) for m in model.modules()
             if isinstance(m, LoraParameter) and m.is_experts and m.adapter_names}
    for layer in removed:
        if isinstance(layer, LoraParameter) and layer.replaced_implementation is not None:
            module = innermost(layer)
            if id(module.config) not in still:
                experts.restore_experts(module, layer.replaced_implementation)


def expert_weights(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Every expert weight of ``model`` (the 3-D weights of experts modules that transformers' experts
    interface serves): full name -> (element count, whether an adapter targets it)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraParameter) or not experts.is_interface_experts(module):
            continue
        outer = _outer_name(name)
        holder = model.get_submodule(outer) if outer else model
        adapted = {layer.parameter_name for layer in wrappers(holder) if layer.adapter_names}
        for weight in experts.weight_names(module):
            param = getattr(module, weight, None)
            if isinstance(param, nn.Parameter):
                found[f"{outer}.{weight}"] = (param.numel(), weight in adapted)
    return found


def untargeted_experts_note(model: nn.Module, what: str = "the adapter's targets") -> str | None:
    """One line when expert weights sit outside every adapter (how many parameters), else None."""
    weights = expert_weights(model)
    left = {k: n for k, (n, adapted) in weights.items() if not adapted}
    if not left:
        return None
    total = sum(p.numel() for p in model.parameters())
    count = sum(left.values())
    kinds = sorted({re.sub(r"^.*?\.\d+\.", "", k) for k in left})
    return (f"{what} leave the experts out: {count:,} of the model's {total:,} parameters ({100 * count / total:.1f} %) "
            f"sit in expert weights no adapter trains ({', '.join(kinds)}; {len(left)} tensors). To train them, add "
            f"target_parameters: [{', '.join(kinds)}] (LoRA per expert on its routed tokens)")

