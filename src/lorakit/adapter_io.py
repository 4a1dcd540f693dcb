"""Save and load a model's adapters as PEFT adapter folders, key for key (adapter file I/O; the
training run's checkpoints are :mod:`lorakit.train.checkpoints`).

The format itself (file names, key mapping, which tensors are an adapter's, the multi-adapter
layout) is :mod:`lorakit.adapters.peft_format`; this module moves a model's tensors in and out of
it. Loading checks every key and shape before anything is kept: a failed load leaves the model as
it was.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from lorakit._fs import atomic_write, atomic_write_text
from lorakit.adapters import pissa
from lorakit.adapters.config import CONFIG_NAME, LoraConfig
from lorakit.adapters.lora import LoraLayer, LoraLinear
from lorakit.adapters.peft_format import (WEIGHTS_NAME, adapter_folder, adapter_folders, file_key, module_of,
                                          part_file_key, read_tensors, with_prefix, without_prefix)
from lorakit.errors import LorakitError
from lorakit.inject import (
    add_adapter, adapter_configs, bias_parameters, delete_adapter, named_adapter_layers, set_active,
)
from lorakit.spectrum_model import CONFIG_NAME as SPECTRUM_CONFIG


# -- keys ----------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under PEFT's file keys (detached, contiguous copies)."""
    config = adapter_configs(model).get(name)
    if config is None:
        raise LorakitError(f"no adapter named {name!r} to save")
    return {key: tensor.detach().clone().contiguous()
            for key, (_, tensor) in _adapter_entries(model, name, config).items()}


def _adapter_entries(model: nn.Module, name: str, config: LoraConfig) -> dict[str, tuple[str, torch.Tensor]]:
    """file key -> (model key, the model's tensor) for every tensor adapter ``name`` owns."""
    entries = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        saved_as = file_key(key, name)
        if saved_as is not None:
            entries[saved_as] = (key, tensor)
    for key, param in bias_parameters(model, config.bias).items():
        entries[with_prefix(key)] = (key, param)
    return entries


def _embedding_entries(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """The input/output embedding weights, which PEFT also writes when an embedding is targeted
    (for resized vocabularies): read when present, never required, not written by us."""
    wanted = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None:
            wanted.append(module.base_layer if isinstance(module, LoraLayer) else module)
    entries = {}
    for module_name, module in model.named_modules():
        if any(module is w for w in wanted):
            for param_name, param in module.named_parameters(recurse=False):
                key = f"{module_name}.{param_name}"
                entries[with_prefix(key)] = (key, param)
    return entries


# -- save ----------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module,
    folder: str | Path,
    names: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    pissa_to_lora: bool = False,
) -> list[Path]:
    """Write adapters in PEFT's layout: ``default`` in ``folder``, others in ``folder/<name>``.

    Args:
        model: a model with adapters added or loaded.
        folder: the output folder (created).
        names: which adapters (default: all).
        base_model_name_or_path: recorded in the config; defaults to the model's own name.
        pissa_to_lora: write PiSSA adapters as plain LoRA adapters of rank 2r that work on the
            original (untouched) base model, as PEFT's conversion does.

    Returns:
        The folders written.
    """
    from safetensors.torch import save_file

    configs = adapter_configs(model)
    names = list(configs) if names is None else names
    if not names:
        raise LorakitError("the model has no adapter to save")
    written = []
    for name in names:
        if name not in configs:
            raise LorakitError(f"no adapter named {name!r} (loaded: {', '.join(configs) or 'none'})")
        out = adapter_folder(folder, name)
        out.mkdir(parents=True, exist_ok=True)
        config = configs[name]
        base = base_model_name_or_path or config.base_model_name_or_path or model_name(model)
        tensors = adapter_state_dict(model, name)
        config = dataclasses.replace(config, base_model_name_or_path=base)
        if pissa_to_lora and pissa.is_pissa(config.init_lora_weights):
            config = _pissa_as_lora(model, name, config, tensors)
        atomic_write(out / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
        atomic_write_text(out / CONFIG_NAME, config.to_json())
        written.append(out)
    return written


def _pissa_as_lora(model: nn.Module, name: str, config: LoraConfig, tensors: dict[str, torch.Tensor]) -> LoraConfig:
    """Replace a PiSSA adapter's A/B by the rank-2r LoRA of its change since init; same scaling."""
    for module_name, layer in named_adapter_layers(model):
        if isinstance(layer, LoraLinear) and name in layer.options:
            A, B = layer.pissa_as_lora(name)
            tensors[part_file_key(module_name, "lora_A")] = A.contiguous()
            tensors[part_file_key(module_name, "lora_B")] = B.contiguous()
    # Doubling r keeps s = alpha/r with alpha doubled, or s = alpha/√r with alpha × √2 (rsLoRA).
    factor = 2 ** 0.5 if config.use_rslora else 2
    return dataclasses.replace(
        config, r=2 * config.r, lora_alpha=config.lora_alpha * factor, init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def model_name(model: nn.Module) -> str | None:
    """The name or path the model was loaded from, if it says."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    return name or None


# -- load ----------------------------------------------------------------------------------------


def load_adapter(
    model: nn.Module,
    folder: str | Path,
    name: str = "default",
    trainable: bool = False,
    activate: bool = True,
    allow_pickle: bool = False,
) -> LoraConfig:
    """Load the PEFT-format adapter in ``folder`` into ``model`` as adapter ``name``.

    Args:
        model: the base model (or one with other adapters already).
        folder: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        name: the name to give the adapter.
        trainable: keep its tensors trainable (to continue training); else frozen.
        activate: make it the only active adapter.
        allow_pickle: accept an ``adapter_model.bin`` (read with ``weights_only=True``).

    Returns:
        The adapter's config.

    Raises:
        LorakitError: missing/corrupt files, a config with wrong types, tensors that do not fit
            the model (the module and both shapes are named). The model is left unchanged.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    _refuse_spectrum(folder)
    config = LoraConfig.load(folder)
    tensors, source = read_tensors(folder, allow_pickle=allow_pickle)
    config = dataclasses.replace(config, inference_mode=not trainable)
    try:
        add_adapter(model, config, name, activate=False, strict_targets=False)
    except LorakitError as err:
        raise LorakitError(f"{folder}: {err}") from None
    try:
        _copy_into_model(model, name, tensors, source)
    except BaseException:
        delete_adapter(model, name)
        raise
    if activate:
        set_active(model, [name])
    return adapter_configs(model)[name]


def _refuse_spectrum(folder: Path) -> None:
    if (folder / SPECTRUM_CONFIG).is_file() and not (folder / CONFIG_NAME).is_file():
        raise LorakitError(f"{folder} holds a Spectrum run's trained matrices, not a LoRA adapter; apply them to "
                           "the base with lorakit.spectrum.load_spectrum(model, folder) (they replace the base's "
                           "tensors: there is nothing to merge or to serve as an adapter)")


def load_adapters(model: nn.Module, folder: str | Path, trainable: bool = False) -> list[str]:
    """Load every adapter of a PEFT multi-adapter folder (``default`` at the top, others in
    sub-folders); the first becomes active. Returns their names."""
    folder = Path(folder)
    names = []
    for name, path in adapter_folders(folder):
        load_adapter(model, path, name, trainable=trainable, activate=False)
        names.append(name)
    if not names:
        _refuse_spectrum(folder)
        raise LorakitError(f"{folder}: no {CONFIG_NAME} here or in its sub-folders")
    set_active(model, names[:1])
    return names


def _copy_into_model(model: nn.Module, name: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    entries = _adapter_entries(model, name, adapter_configs(model)[name])
    optional = _embedding_entries(model)
    # Files written without the prefix (seen in the wild) are read too.
    tensors = {with_prefix(without_prefix(k)): v for k, v in tensors.items()}
    missing = sorted(set(entries) - set(tensors))
    unexpected = sorted(set(tensors) - set(entries) - set(optional))
    entries = {**optional, **entries}
    if missing:
        raise LorakitError(
            f"{source}: {len(missing)} tensor(s) that its config implies are missing, e.g. "
            f"{', '.join(missing[:3])}; the file does not belong to this adapter_config.json or this model"
        )
    if unexpected:
        raise LorakitError(
            f"{source}: {len(unexpected)} tensor(s) match nothing this adapter adapts in the model, e.g. "
            f"{', '.join(unexpected[:3])}; was it trained on another base model?"
        )
    for saved_key, tensor in tensors.items():
        model_key, target = entries[saved_key]
        if tuple(tensor.shape) != tuple(target.shape):
            module = module_of(model_key)
            raise LorakitError(
                f"{source}: {saved_key} has shape {tuple(tensor.shape)} but module {module} of the base "
                f"model needs {tuple(target.shape)}; the adapter was trained on a different base model"
            )
        if not tensor.is_floating_point():
            raise LorakitError(f"{source}: {saved_key} holds {tensor.dtype} values, expected floating point")
    with torch.no_grad():
        for saved_key, tensor in tensors.items():
            _, target = entries[saved_key]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
