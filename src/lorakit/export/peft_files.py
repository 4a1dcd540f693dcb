"""An adapter folder as the exporters see it: config, per-module factors, true scale, leftovers.

The PEFT file format itself (key names, the scale rule, reading a folder) belongs to lorakit's
adapter-format code; this module only sorts what it reads into what an export needs.
:func:`_read_files` and :func:`_scaling` are the two places that call into that code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.config import LoraConfig
from lorakit.errors import LorakitError


@dataclass
class Adapter:
    """One adapter folder: its config and tensors, sorted by what they are."""

    folder: Path
    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r)), fp32
    embeddings: list[str] = field(default_factory=list)  # modules with embedding LoRA
    lora_bias: list[str] = field(default_factory=list)  # modules with a lora_B bias
    extra: list[str] = field(default_factory=list)  # other tensors: modules_to_save, biases, magnitudes…

    @property
    def modules(self) -> list[str]:
        """The LoRA-adapted linear modules, in file order."""
        return list(self.lora)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``module`` as trained (fp32)."""
        return self.lora[module]

    def scale(self, module: str) -> float:
        """PEFT's scale of ``module``: ``alpha/r`` or ``alpha/√r`` after rank/alpha patterns."""
        r = self.lora[module][0].shape[0]
        expected = self.config.rank_for(module)
        if r != expected:
            raise LorakitError(f"{self.folder}: {module} has rank {r} in the file but {expected} by its "
                               "adapter_config.json (r / rank_pattern); the files do not belong together")
        return _scaling(self.config, module, r)


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT adapter folder for export.

    Raises:
        LorakitError: a missing folder or file, a config lorakit cannot read, or factors that do not
            pair up (A without B, ranks that differ).
    """
    folder = Path(folder)
    config, modules, other = _read_files(folder)
    adapter = Adapter(folder=folder, config=config, lora={}, extra=list(other))
    for module, parts in modules.items():
        if "lora_embedding_A" in parts or "lora_embedding_B" in parts:
            adapter.embeddings.append(module)
        if "lora_B.bias" in parts:
            adapter.lora_bias.append(module)
        if "lora_magnitude_vector" in parts:
            adapter.extra.append(module + ".lora_magnitude_vector")
        if "lora_A" not in parts and "lora_B" not in parts:
            continue
        A, B = parts.get("lora_A"), parts.get("lora_B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            shapes = [None if t is None else tuple(t.shape) for t in (A, B)]
            raise LorakitError(f"{folder}: {module} has lora_A {shapes[0]} and lora_B {shapes[1]}; "
                               "the adapter file is inconsistent")
        adapter.lora[module] = (A.float(), B.float())
    return adapter


# -- the adapter-format code this module reads through ----------------------------------------------
# (The house refactor, #17, gives lorakit one module that owns the PEFT format: these become
# ``peft_format.read_adapter`` and ``peft_format.module_scaling``.)

_PARTS = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B",
          ".lora_magnitude_vector")


def _read_files(folder: Path) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The folder's config; its LoRA tensors as module -> part -> tensor; every other tensor by key."""
    from lorakit.checkpoint import PREFIX, read_adapter_tensors

    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    config = LoraConfig.load(folder)
    tensors, _ = read_adapter_tensors(folder)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        bare = key.removeprefix(PREFIX)
        suffix = next((s for s in _PARTS if bare.endswith(s) and len(bare) > len(s)), None)
        if suffix is None:
            other[key] = tensor
        else:
            modules.setdefault(bare[: -len(suffix)], {})[re.sub(r"\.weight$", "", suffix[1:])] = tensor
    return config, modules, other


def _scaling(config: LoraConfig, module: str, r: int) -> float:
    from lorakit.adapters.lora import AdapterOptions

    return AdapterOptions(r=r, alpha=config.alpha_for(module), use_rslora=config.use_rslora).scaling
