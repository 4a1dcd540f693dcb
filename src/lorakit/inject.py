"""Find target modules by name and swap in adapter layers, in place, on any ``nn.Module``.

No per-architecture code: targets are module names (exact or dotted suffix), a full-match regex,
or ``all-linear`` (every Linear/Conv1D but the output head). The matching rules are PEFT's
(REFERENCE.md "LoRA math"), so a config selects the same modules here and in PEFT — except that we
are stricter: every listed target must match something, and the error names the closest modules.

State lives where it belongs: adapter tensors and active/merged sets on each layer
(:mod:`lorakit.adapters.lora`); the per-adapter :class:`LoraConfig` (needed again to save), the
active list and the on/off switch (:func:`set_enabled`) in one :class:`AdapterState` kept in the
model instance's ``__dict__`` (no class is patched).

Trainability follows one rule, re-applied whenever adapters change (:func:`refresh_trainable`):
the tensors of active adapters not loaded for inference train; base biases train per the
adapter's ``bias`` mode; every other parameter is frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import re
from collections.abc import Iterator

from dataclasses import dataclass, field

from torch import nn

from lorakit import parameter_targets
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.lora import AdapterOptions, LoraLayer, is_linear, wrap
from lorakit.adapters.parameter import innermost
from lorakit.adapters.peft_format import is_adapter_tensor, is_wrapper_module
from lorakit.adapters.saved_modules import ModulesToSave
from lorakit.errors import LorakitError

STATE_ATTR = "lorakit_state"
_HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")  # never targeted by all-linear
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- public API ----------------------------------------------------------------------------------


def add_adapter(
    model: nn.Module,
    config: LoraConfig,
    name: str = "default",
    activate: bool = True,
    strict_targets: bool = True,
) -> list[str]:
    """Add LoRA adapter ``name`` to ``model`` in place.

    The model keeps a copy of ``config`` with ``all-linear`` resolved to module names, as saved.

    Args:
        model: any module; its submodules are found by name.
        config: ranks, targets and options.
        name: the adapter's name (letters, digits, ``_``, ``-``).
        activate: make it the (only) active adapter.
        strict_targets: every listed target must match a module (off when loading a saved
            adapter, whose tensors are checked instead).

    Returns:
        The names of the modules that received the adapter, then the full names of the parameters
        (``target_parameters``) that did.

    Raises:
        LorakitError: a bad name, a target that matches nothing, or a matched module LoRA cannot wrap.
    """
    check_adapter_name(name)
    configs = adapter_configs(model)
    if name in configs:
        raise LorakitError(f"adapter {name!r} already exists; delete it first or pick another name")
    if config.bias != "none" and any(c.bias != "none" for c in configs.values()):
        raise LorakitError("only one adapter per model may train base biases (bias='all' or 'lora_only')")
    config, targets, parameters = resolve_config(model, config, strict=strict_targets)
    _find_modules_to_save(model, config)  # a missing entry is refused before the model is changed
    parameter_targets.check_same_parameters(configs, config, name)
    parameter_targets.check_parameters(model, parameters, lambda key: _options(config, key), targets)  # before any change
    for module_name in targets:
        layer = _ensure_lora_layer(model, module_name)
        if getattr(layer, "fan_in_fan_out", False):
            config.fan_in_fan_out = True  # GPT-2 Conv1D: PEFT records it the same way
        layer.add(name, _options(config, module_name))
    for module_name, param_name, key in parameters:
        layer = parameter_targets.ensure_parameter_layer(model, module_name, param_name)
        layer.add(name, _options(config, key))
    for module_name in _find_modules_to_save(model, config):
        wrapper = _get(model, module_name)
        if not isinstance(wrapper, ModulesToSave):
            wrapper = ModulesToSave(wrapper)
            set_submodule(model, module_name, wrapper)
        wrapper.add(name)
    configs[name] = config
    if not is_enabled(model):
        for layer in adapter_layers(model):  # the new layers follow the switch (no unmerge: it is a flag)
            layer.disabled = True
    if activate:
        set_active(model, [name])
    else:
        refresh_trainable(model)
    return targets + [key for _, _, key in parameters]


def _options(config: LoraConfig, name: str) -> AdapterOptions:
    """The options of ``config`` on the module (or parameter) ``name``, rank/alpha patterns applied."""
    return AdapterOptions(
        r=config.rank_for(name), alpha=config.alpha_for(name), dropout=config.lora_dropout,
        use_rslora=config.use_rslora, init=config.init_lora_weights, lora_bias=config.lora_bias,
        use_dora=config.use_dora,
    )


def resolve_config(model: nn.Module, config: LoraConfig,
                   strict: bool = True) -> tuple[LoraConfig, list[str], list[tuple[str, str, str]]]:
    """What ``config`` adapts on ``model``, as :func:`add_adapter` will: the config as it is saved
    (PEFT's MoE rewrite applied, ``all-linear`` resolved), the module names, and the targeted
    parameters as ``(module name, parameter name, full key)`` (see :mod:`lorakit.parameter_targets`).
    Changes nothing.

    Raises:
        LorakitError: as :func:`add_adapter`.
    """
    linear = find_targets(model, config, strict=False) if config.target_modules == "all-linear" else None
    config = parameter_targets.convert_moe_targets(model, dataclasses.replace(config), linear)
    parameters = parameter_targets.find_parameters(model, config, strict=strict)
    targets = find_targets(model, config, strict=strict, allow_empty=bool(parameters))
    if config.target_modules == "all-linear":
        config.target_modules = _saved_targets(model, config, targets)
    return config, targets, parameters


@dataclass
class AdapterState:
    """What a model knows of its adapters beyond the layers: configs by name, the active list, and
    whether adapters apply at all (:func:`set_enabled`)."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    enabled: bool = True


def adapter_state(model: nn.Module) -> AdapterState:
    """The :class:`AdapterState` of ``model`` (created empty on first use)."""
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        state = model.__dict__[STATE_ATTR] = AdapterState()
    return state


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The configs of the adapters on ``model`` by name (empty dict if none)."""
    return adapter_state(model).configs


def active_adapters(model: nn.Module) -> list[str]:
    """Names of the active adapters (as set by :func:`set_active`)."""
    return list(adapter_state(model).active)


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Activate ``names`` (their updates add up); all others become inactive and frozen."""
    names = [names] if isinstance(names, str) else list(names)
    configs = adapter_configs(model)
    for n in names:
        if n not in configs:
            raise LorakitError(f"no adapter named {n!r} (loaded: {', '.join(configs) or 'none'})")
    for layer in adapter_layers(model):
        layer.set_active(names)
    adapter_state(model).active = names
    refresh_trainable(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left without adapters turn back into their base modules."""
    configs = adapter_configs(model)
    if name not in configs:
        raise LorakitError(f"no adapter named {name!r} (loaded: {', '.join(configs) or 'none'})")
    removed = []
    for module_name, layer in reversed(list(named_adapter_layers(model))):  # nested wrappers: inner first
        layer.delete(name)
        if not layer.adapter_names:
            set_submodule(model, module_name, layer.base_layer if isinstance(layer, LoraLayer) else _base(layer))
            removed.append(layer)
    parameter_targets.release_experts(model, removed)
    del configs[name]
    state = adapter_state(model)
    state.active = [a for a in state.active if a != name]
    refresh_trainable(model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """The one switch over every adapter of ``model``.

    ``False``: the model computes as the base model alone (merged adapters are unmerged first, since
    bypassing a layer cannot undo a merge); adapters added while it is off stay off. ``True``: the
    active adapters apply again (they stay unmerged). :func:`disabled` is the scoped form.
    """
    for layer in adapter_layers(model):
        if not enabled and isinstance(layer, LoraLayer):
            layer.unmerge()
        layer.disabled = not enabled
    adapter_state(model).enabled = enabled


def is_enabled(model: nn.Module) -> bool:
    """Where :func:`set_enabled` stands (True for a model that never had it called)."""
    return adapter_state(model).enabled


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Context in which ``model`` computes as the base model; the switch is put back as it was
    (so nested blocks, and a block on a model already switched off, leave it as they found it)."""
    before = is_enabled(model)
    set_enabled(model, False)
    try:
        yield model
    finally:
        set_enabled(model, before)


def disable(model: nn.Module) -> None:
    """``set_enabled(model, False)``, under the name PEFT users look for (``disable_adapter_layers``)."""
    set_enabled(model, False)


def enable(model: nn.Module) -> None:
    """``set_enabled(model, True)``, under the name PEFT users look for (``enable_adapter_layers``)."""
    set_enabled(model, True)


def adapter_layers(model: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    """Every LoRA layer and modules_to_save wrapper in ``model``."""
    for _, layer in named_adapter_layers(model):
        yield layer


def refresh_trainable(model: nn.Module) -> None:
    """Set ``requires_grad`` everywhere from the adapter state (see the module docstring)."""
    state = adapter_state(model)
    training = {n for n in state.active if not state.configs[n].inference_mode}
    configs = state.configs
    for param in model.parameters():
        param.requires_grad_(False)
    for module_name, layer in named_adapter_layers(model):
        if isinstance(layer, LoraLayer):
            for attr in layer.adapter_attrs:
                for adapter, item in getattr(layer, attr).items():
                    for param in (item.parameters() if isinstance(item, nn.Module) else [item]):
                        param.requires_grad_(adapter in training)
        else:
            for adapter, copy_ in layer.modules_to_save.items():
                copy_.requires_grad_(adapter in training)
    for adapter in training:
        for param in bias_parameters(model, configs[adapter].bias).values():
            param.requires_grad_(True)


def bias_parameters(model: nn.Module, mode: str) -> dict[str, nn.Parameter]:
    """Base biases trained under ``mode`` (``none``/``all``/``lora_only``), by model key."""
    if mode == "none":
        return {}
    found = {}
    for key, param in model.named_parameters():
        if not key.endswith("bias") or is_adapter_tensor(key):
            continue
        if mode == "all" or (mode == "lora_only" and key.endswith("base_layer.bias")):
            found[key] = param
    return found


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts, adapters included, as PEFT counts them."""
    trainable = total = 0
    for param in model.parameters():
        count = param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


trainable_parameters = parameter_counts
"""The first name of :func:`parameter_counts` (it returns counts, not parameters), kept for existing code."""


def check_adapter_name(name: str) -> None:
    """Adapter names become file-system folders and state-dict key parts: keep them plain."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise LorakitError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-'"
        )


# -- target matching -----------------------------------------------------------------------------


def find_targets(model: nn.Module, config: LoraConfig, strict: bool = True, allow_empty: bool = False) -> list[str]:
    """Names of the modules ``config`` adapts, in model order.

    Args:
        model: the model to search.
        config: its ``target_modules``, ``exclude_modules``, layer filters, ``modules_to_save``.
        strict: every listed target must match some module (PEFT only needs one to).
        allow_empty: no module is fine (the adapter targets parameters only).

    Raises:
        LorakitError: a listed target (or the regex) matches no module, the selection is empty,
            or a matched module is not Linear/Conv1D/Embedding.
    """
    names = _candidate_names(model)
    if config.target_modules is None or (allow_empty and not config.target_modules):
        if allow_empty:
            return []
        raise LorakitError("target_modules is not set: give module names, a regex, or 'all-linear' "
                           "(or target_parameters)")
    if config.target_modules == "all-linear":
        heads = _output_heads(model)
        chosen = [n for n in names if is_linear(_base(_get(model, n))) and n not in heads]
        chosen = [n for n in chosen if not _excluded(config, n) and _in_layers(config, n)]
    else:
        if strict:
            _check_every_target_matches(config.target_modules, names)
        chosen = [n for n in names if _matches_target(config, n) and not _excluded(config, n)]
    if not chosen and not allow_empty:
        raise LorakitError(
            f"target_modules {config.target_modules!r} selects no module after exclude_modules, "
            f"modules_to_save and layers_to_transform={config.layers_to_transform}"
        )
    for n in chosen:
        module = _base(_get(model, n))
        if not (is_linear(module) or isinstance(module, nn.Embedding)):
            raise LorakitError(
                f"target {n!r} is a {type(module).__name__}; LoRA wraps nn.Linear, transformers "
                "Conv1D and nn.Embedding — name the linear layers inside it instead"
            )
    return chosen


def _candidate_names(model: nn.Module) -> list[str]:
    # Every module name a user could mean, without our own internals (base_layer, lora_A.x, …).
    names = []
    for name, _ in model.named_modules():
        if name and not is_wrapper_module(name):
            names.append(name)
    return names


def _name_matches(targets: list[str], name: str) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _matches_target(config: LoraConfig, name: str) -> bool:
    targets = config.target_modules
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True  # an exact full name is taken as is, whatever layers_to_transform says (PEFT)
    return _name_matches(targets, name) and _in_layers(config, name)


def _in_layers(config: LoraConfig, name: str) -> bool:
    if config.layers_to_transform is None:
        return True
    index = _layer_index(name, config.layers_pattern)
    return index is not None and index in config.layers_to_transform


def _saved_targets(model: nn.Module, config: LoraConfig, chosen: list[str]) -> list[str]:
    """``all-linear`` as PEFT saves it: the resolved names, shortened to the fewest trailing name
    parts that still select exactly ``chosen`` when there are 20 or more."""
    if len(chosen) < 20:
        return list(chosen)
    names = _candidate_names(model)
    for depth in range(1, max(n.count(".") for n in chosen) + 2):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in chosen})
        trial = dataclasses.replace(config, target_modules=suffixes)
        if [n for n in names if _matches_target(trial, n) and not _excluded(trial, n)] == chosen:
            return suffixes
    return list(chosen)


def _layer_index(name: str, layers_pattern: list[str] | None) -> int | None:
    # The first numbered segment after a named list (`layers.3.`), not a nested one (`experts.0.`).
    patterns = layers_pattern or [r"[^.]*"]
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def _excluded(config: LoraConfig, name: str) -> bool:
    exclude = config.exclude_modules
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return True
        if not isinstance(exclude, str) and _name_matches(exclude, name):
            return True
    # A module trained in full never also gets an adapter.
    return bool(config.modules_to_save) and any(
        re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in config.modules_to_save
    )


def _check_every_target_matches(targets: list[str] | str, names: list[str]) -> None:
    if isinstance(targets, str):
        if not any(re.fullmatch(targets, n) for n in names):
            raise LorakitError(
                f"target_modules regex {targets!r} matches no module name (it must match the whole "
                f"name); some names: {', '.join(names[:6])}"
            )
        return
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    for target in targets:
        if not any(_name_matches([target], n) for n in names):
            close = difflib.get_close_matches(target, suffixes + names, n=5, cutoff=0.5)
            hint = f"closest module names: {', '.join(close)}" if close else f"module names end in: {', '.join(suffixes[:12])}"
            raise LorakitError(f"target module {target!r} matches no module in the model; {hint}")


def _output_heads(model: nn.Module) -> set[str]:
    heads = {n for n in _HEAD_NAMES if n in dict(model.named_children())}
    get_output = getattr(model, "get_output_embeddings", None)
    if callable(get_output):
        head = get_output()
        for name, module in model.named_modules():
            if module is head or (isinstance(module, (LoraLayer, ModulesToSave)) and _base(module) is head):
                heads.add(name)
    return heads


def _find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = _candidate_names(model)
    chosen = []
    for target in config.modules_to_save:
        found = [n for n in names if n == target or n.endswith("." + target)]
        if not found:
            close = difflib.get_close_matches(target, names, n=5, cutoff=0.5)
            raise LorakitError(
                f"modules_to_save entry {target!r} matches no module; closest: {', '.join(close) or 'none'}"
            )
        chosen += [n for n in found if n not in chosen]
    return chosen


# -- module surgery ------------------------------------------------------------------------------


def named_adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSave)):
            yield name, module


def _ensure_lora_layer(model: nn.Module, name: str) -> LoraLayer:
    module = _get(model, name)
    if isinstance(module, LoraLayer):
        return module
    layer = wrap(module)
    set_submodule(model, name, layer)
    return layer


def _base(module: nn.Module) -> nn.Module:
    if isinstance(module, LoraLayer):
        return innermost(module.base_layer)
    if isinstance(module, ModulesToSave):
        return module.original_module
    return module


def _get(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
