"""Merge adapters into the base weights, take them out again, or drop them.

(The module is ``merging`` so that the package-level function ``lorakit.merge`` is not shadowed
by a submodule of the same name.)

``merge`` folds ``ΔW = s·B A`` into ``W`` (fp32 sum, cast back) for every adapted layer; it is an
explicit call and merging twice changes nothing. Every layer's update is checked for NaN/inf
before the first weight changes. ``merge_and_unload`` returns the plain base architecture with the
updates folded in; ``unload`` returns it without them.
"""

from __future__ import annotations

from torch import nn

from lorakit import parameter_targets
from lorakit.adapters.lora import LoraLayer
from lorakit.adapters.parameter import LoraParameter
from lorakit.errors import LorakitError
from lorakit.inject import active_adapters, adapter_state, named_adapter_layers, set_submodule


def merge(model: nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters (default: the active ones) into the base weights, in place.

    Raises:
        LorakitError: an update holds NaN/inf; no weight has been changed.
    """
    _check_module(model)
    layers = [layer for _, layer in named_adapter_layers(model) if isinstance(layer, LoraLayer)]
    names = active_adapters(model) if names is None else names
    unknown = [n for n in names if n not in adapter_state(model).configs]
    if unknown:
        known = ", ".join(adapter_state(model).configs) or "none"
        raise LorakitError(f"merge: no adapter named {', '.join(map(repr, unknown))} on this model (it has: {known})")
    for layer in layers:  # check all first: a bad adapter must not leave the model half merged
        todo = [n for n in names if n in layer.options and n not in layer.merged]
        if todo:
            layer.check_merge(todo)
    _untie(model, [layer for layer in layers if any(n in layer.options and n not in layer.merged for n in names)])
    for layer in layers:
        layer.merge(names)


def _check_module(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise LorakitError(f"expected a torch nn.Module with adapters, got {type(model).__name__} ({model!r:.80})")


def _untie(model: nn.Module, layers: list[LoraLayer]) -> None:
    """Give each layer about to merge its own copy of a weight it shares with another module.

    Tied embeddings (GPT-2, Gemma, SmolLM2) use one tensor as input embedding and output head; an
    adapter on one of them must not change the other when merged. The config is updated so that a
    saved merged model is not re-tied on load.
    """
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    untied = False
    for layer in layers:
        owner, attr = ((layer.target_module, layer.parameter_name) if isinstance(layer, LoraParameter)
                       else (layer.base_layer, "weight"))
        weight = getattr(owner, attr)
        if counts.get(id(weight), 0) > 1:
            setattr(owner, attr, nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad))
            untied = True
    config = getattr(model, "config", None)
    if untied and config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter back out of the base weights."""
    for _, layer in named_adapter_layers(model):
        if isinstance(layer, LoraLayer):
            layer.unmerge()


def merge_and_unload(model: nn.Module, names: list[str] | None = None) -> nn.Module:
    """Merge adapters (default: the active ones), then remove every adapter layer.

    ``modules_to_save`` keep their active trained copy. Returns ``model``, now of the base
    architecture, with no trace of lorakit.
    """
    _check_module(model)
    names = active_adapters(model) if names is None else names
    merge(model, names)
    return _strip(model, keep_trained_copies=True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter layer without merging: the original base model comes back."""
    unmerge(model)
    return _strip(model, keep_trained_copies=False)


def _strip(model: nn.Module, keep_trained_copies: bool) -> nn.Module:
    removed = list(named_adapter_layers(model))
    for module_name, layer in reversed(removed):  # nested wrappers (target_parameters): inner first
        if isinstance(layer, LoraLayer):
            replacement = layer.base_layer
        elif keep_trained_copies and not layer.disabled and layer.active:
            replacement = layer.modules_to_save[layer.active[0]]
        else:
            replacement = layer.original_module
        set_submodule(model, module_name, replacement)
    parameter_targets.release_experts(model, [layer for _, layer in removed])
    state = adapter_state(model)
    state.configs.clear()
    state.active.clear()
    return model
