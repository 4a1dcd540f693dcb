"""Spectrum in a training run: ``targets: spectrum:N`` resolved by the scan, and ``method: spectrum``
set up on the model (only the selection trains; checkpoints save its tensors, not an adapter).

The analysis itself (SNR, scan, selection) is :mod:`lorakit.spectrum`; freezing and the folder a
Spectrum-trained model's tensors go to are :mod:`lorakit.spectrum_model`. This module holds what
only training needs: the targets, the set-up, and how the run's trained weights are written
(:func:`weights_writer`, which the run hands to :mod:`lorakit.train.checkpoints`; nothing is marked
on the model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch

from lorakit import spectrum
from lorakit.adapter_io import save_adapter
from lorakit.adapters.layout import is_linear
from lorakit.errors import LorakitError
from lorakit.models import resolve
from lorakit.spectrum_model import freeze_for_spectrum, load_spectrum, save_spectrum
from lorakit.train.checkpoints import WeightsWriter
from lorakit.train.config import RunConfig


def resolve_targets(config: RunConfig, say: Callable[[str], None] = print,
                    model: torch.nn.Module | None = None) -> list[str] | str:
    """The adapter's target modules, with ``spectrum:N`` replaced by the modules Spectrum selects
    (for LoRA on ``model``: only those LoRA can wrap — an MoE router is a matrix, not a linear layer).

    The scan reads the base model's safetensors one matrix at a time and is cached per model,
    so only the first run on a model pays for it (SmolLM2-135M: a few seconds).
    """
    top = config.adapter.spectrum_top
    if top is None:
        return config.adapter.targets
    results = spectrum.scan(resolve(config.model))
    modules = spectrum.selected_modules(results, top)
    if not modules:
        raise LorakitError(f"adapter.targets: spectrum:{top:g} selects no matrix of {config.model} "
                           f"(int(layers × {top:g} / 100) is 0 in every module type); raise the percentage")
    say(f"spectrum:{top:g}: {len(modules)} of {len(results)} matrices selected by signal-to-noise ratio")
    if model is not None and config.adapter.method != "spectrum":
        kept = [m for m in modules if is_linear(model.get_submodule(m))]
        if len(kept) < len(modules):
            say(f"spectrum:{top:g}: {len(modules) - len(kept)} selected matrices are not linear layers (e.g. "
                f"{next(m for m in modules if m not in kept)}, a router) and get no LoRA; "
                "adapter.target_parameters can name them")
        modules = kept
    return modules


def prepare_spectrum(model: torch.nn.Module, config: RunConfig, targets: list[str] | str,
                     resume_from: Path | None) -> None:
    """``method: spectrum`` on ``model``, in place: only ``targets`` (and by default the embeddings)
    train, and a resumed run gets its checkpoint's tensors."""
    freeze_for_spectrum(model, targets, train_embeddings=config.adapter.spectrum_embeddings)
    if resume_from is not None:
        load_spectrum(model, resume_from)


def weights_writer(config: RunConfig) -> WeightsWriter:
    """How a run of ``config`` writes its trained weights: the PEFT adapter, or for ``method:
    spectrum`` the selection's tensors (:func:`lorakit.spectrum_model.save_spectrum`)."""
    if config.adapter.method == "spectrum":
        return functools.partial(save_spectrum, base_model=config.model, top=config.adapter.spectrum_top)
    return save_adapter
