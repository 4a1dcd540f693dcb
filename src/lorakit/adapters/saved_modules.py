"""``modules_to_save``: modules trained in full, one copy per adapter (e.g. a classifier head).

The original stays untouched as ``original_module``; each adapter owns a copy in
``modules_to_save[name]``. The attribute names are PEFT's, so state-dict keys map to its file keys
(``<module>.modules_to_save.<name>.weight`` ↔ ``<module>.weight``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModulesToSave(nn.Module):
    """A module with a trainable copy per adapter; the active copy runs, or the original."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add(self, name: str) -> None:
        copy_ = copy.deepcopy(self.original_module)
        for param in copy_.parameters():
            param.requires_grad_(True)
        self.modules_to_save[name] = copy_
        self.train(self.original_module.training)

    def delete(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        self.active = [a for a in self.active if a != name]

    def set_active(self, names: list[str]) -> None:
        # One module cannot run two copies: the first active adapter that has one wins.
        self.active = [n for n in names if n in self.modules_to_save][:1]

    @property
    def current(self) -> nn.Module:
        if self.disabled or not self.active:
            return self.original_module
        return self.modules_to_save[self.active[0]]

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str):
        # transformers reads attributes such as `weight` off heads (tying, output embeddings); they
        # come from the module that currently runs. One level, our own class only.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("original_module", "modules_to_save", "active", "disabled"):
                raise  # half-built object (deepcopy, unpickling): no forwarding
            return getattr(self.current, name)
