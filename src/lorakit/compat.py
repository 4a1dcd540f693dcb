"""The PEFT-style facade: existing PEFT code migrates by changing one import.

::

    from lorakit import LoraConfig, get_peft_model          # instead of: from peft import ...
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    model.print_trainable_parameters()
    model.save_pretrained("out")                             # a PEFT adapter folder

A thin wrapper over the functional core (:mod:`lorakit.inject`, :mod:`lorakit.adapter_io`,
:mod:`lorakit.merging`), laid out like PEFT's so that ``peft_model.base_model.model`` is the
transformer and ``peft_model.state_dict()`` keys start with ``base_model.model.``. Attributes the
wrapper does not define are read from the wrapped model (one level of forwarding, no more).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from lorakit import adapter_io, inject, merging
from lorakit.adapters.config import LoraConfig

__all__ = ["LoraConfig", "LoraModel", "PeftModel", "get_peft_model"]


class LoraModel(nn.Module):
    """Holds the adapted model as ``.model`` (PEFT's ``base_model`` level)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)


class PeftModel(nn.Module):
    """A model with LoRA adapters, with PEFT's ``PeftModel`` methods."""

    def __init__(self, model: nn.Module, config: LoraConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_model = LoraModel(model)
        if config is not None:
            if config.base_model_name_or_path is None:
                config = dataclasses.replace(config, base_model_name_or_path=adapter_io.model_name(model))
            inject.add_adapter(model, config, adapter_name)

    # -- what PEFT users reach for -------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.base_model.model

    def get_base_model(self) -> nn.Module:
        """The wrapped model (with adapter layers in it)."""
        return self.base_model.model

    @property
    def peft_config(self) -> dict[str, LoraConfig]:
        return inject.adapter_configs(self.model)

    @property
    def active_adapters(self) -> list[str]:
        return inject.active_adapters(self.model)

    @property
    def active_adapter(self) -> str:
        active = self.active_adapters
        return active[0] if active else ""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.generate(*args, **kwargs)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig) -> None:
        """Add a new (inactive) adapter; ``set_adapter`` makes it the active one."""
        inject.add_adapter(self.model, peft_config, adapter_name, activate=False)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate ``adapter_name`` (several names: their updates add up)."""
        inject.set_active(self.model, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        inject.delete_adapter(self.model, adapter_name)

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False,
                     allow_pickle: bool = False) -> LoraConfig:
        """Load a PEFT adapter folder as ``adapter_name`` (inactive until ``set_adapter``)."""
        return adapter_io.load_adapter(self.model, model_id, adapter_name, trainable=is_trainable,
                                       activate=not self.active_adapters, allow_pickle=allow_pickle)

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None) -> None:
        """Write PEFT's folder layout (``default`` at the top, others in sub-folders)."""
        adapter_io.save_adapter(self.model, save_directory, names=selected_adapters)

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default",
                        is_trainable: bool = False, allow_pickle: bool = False) -> PeftModel:
        """Wrap ``model`` and load the adapter in folder ``model_id`` (active)."""
        wrapper = cls(model)
        adapter_io.load_adapter(model, model_id, adapter_name, trainable=is_trainable, allow_pickle=allow_pickle)
        return wrapper

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model computes as the base model."""
        with inject.disabled(self.model):
            yield

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        merging.merge(self.model, adapter_names)

    def unmerge_adapter(self) -> None:
        merging.unmerge(self.model)

    def merge_and_unload(self, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold the (active) adapters in and return the plain base model."""
        return merging.merge_and_unload(self.model, adapter_names)

    def unload(self) -> nn.Module:
        """Return the base model without adapters (not merged)."""
        return merging.unload(self.model)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        return inject.parameter_counts(self.model)

    def print_trainable_parameters(self) -> None:
        """Print PEFT's line: ``trainable params: … || all params: … || trainable%: …``."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "base_model":
                raise
            return getattr(self.base_model.model, name)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Add a LoRA adapter to ``model`` in place and wrap it as a :class:`PeftModel`."""
    return PeftModel(model, peft_config, adapter_name)
