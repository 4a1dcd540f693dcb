"""A model that trains a Spectrum selection, in place, and the folder its trained tensors go to.

Spectrum's counterpart of :mod:`lorakit.inject` and :mod:`lorakit.adapter_io`: instead of adding
adapters, :func:`freeze_for_spectrum` leaves only the selected matrices (and by default the
embeddings and the output head) trainable; :func:`save_spectrum` writes those tensors as
``spectrum_model.safetensors`` with ``spectrum_config.json``, and :func:`load_spectrum` copies
them into a fresh base. The selection itself comes from :mod:`lorakit.spectrum`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorakit._fs import atomic_write, atomic_write_text
from lorakit.errors import LorakitError

CONFIG_NAME = "spectrum_config.json"
WEIGHTS_NAME = "spectrum_model.safetensors"


def _embedding_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    found: dict[str, torch.nn.Parameter] = {}
    by_id = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and id(weight) in by_id:
            found[by_id[id(weight)]] = weight
    return found


def freeze_for_spectrum(model: torch.nn.Module, modules: Iterable[str], *, train_embeddings: bool = True) -> list[str]:
    """Freeze every parameter except the selected modules' weights, in place.

    Args:
        model: the base model.
        modules: full module names from :func:`lorakit.spectrum.selected_modules` (``….mlp.down_proj``).
        train_embeddings: also train the input embeddings and the output head, as the reference
            Spectrum does (default). With tied embeddings they are one tensor.

    Returns:
        The names of the parameters left trainable, sorted.

    Raises:
        LorakitError: a module name does not exist or has no 2-D weight.
    """
    params = dict(model.named_parameters())
    wanted: dict[str, torch.nn.Parameter] = {}
    for module in modules:
        name = f"{module}.weight"
        if name not in params or params[name].dim() != 2:
            raise LorakitError(f"spectrum: module {module!r} has no 2-D weight in this model; "
                               "was the selection made for a different model?")
        wanted[name] = params[name]
    if train_embeddings:
        wanted.update(_embedding_params(model))
    keep = {id(p) for p in wanted.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sorted(wanted)


def save_spectrum(model: torch.nn.Module, out_dir: str | Path, *, base_model: str | None = None,
                  top: float | None = None) -> Path:
    """Write the trainable tensors as ``spectrum_model.safetensors`` plus ``spectrum_config.json``.

    Only parameters with ``requires_grad`` are written (what :func:`freeze_for_spectrum` left
    trainable), so the file is small: the selection, not the model.

    Returns:
        ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise LorakitError("spectrum: no trainable parameters to save; call freeze_for_spectrum first")
    tensors = {n: p.detach().contiguous().cpu() for n, p in trainable.items()}
    atomic_write(out / WEIGHTS_NAME, lambda path: save_file(tensors, path, metadata={"format": "pt"}))
    config = {"method": "spectrum", "base_model_name_or_path": base_model, "top_percent": top,
              "tensors": sorted(tensors), "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")}
    atomic_write_text(out / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_spectrum(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Copy the tensors of a saved Spectrum run into ``model`` in place (any dtype/device).

    Returns:
        The names of the tensors applied.

    Raises:
        LorakitError: files missing, a tensor the model lacks, or a shape that does not fit.
    """
    folder = Path(folder)
    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / needed).is_file():
            raise LorakitError(f"{folder}: no {needed}; expected a folder written by save_spectrum")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise LorakitError(f"{folder / WEIGHTS_NAME}: tensor {name!r} is not a parameter of this model")
        if tuple(params[name].shape) != tuple(t.shape):
            raise LorakitError(f"{folder / WEIGHTS_NAME}: {name} has shape {tuple(t.shape)}, "
                               f"the model's is {tuple(params[name].shape)}; is it the same base model?")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return sorted(tensors)
