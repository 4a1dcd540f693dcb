"""An adapter folder as the exporters see it: per-module factors with their true scale, and what a
llama.cpp adapter cannot hold.

Everything about the PEFT file format (key names, the scale rule, reading the folder) comes from
:mod:`lorakit.adapters.peft_format`; this module only sorts what it reads into what an export needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.peft_format import Factors, read_factors, read_shapes, split_file_key
from lorakit.errors import LorakitError


@dataclass
class Adapter:
    """One adapter folder: its config, its factors by module, the file keys of its other tensors."""

    folder: Path
    config: LoraConfig
    by_module: dict[str, Factors]  # module -> factors and scale, as peft_format reads them (fp32)
    other: list[str]  # file keys of tensors that are no LoRA part: modules_to_save, trained biases

    @property
    def modules(self) -> list[str]:
        """The LoRA-adapted linear modules, in file order."""
        return [m for m, f in self.by_module.items() if not f.embedding]

    @property
    def embeddings(self) -> list[str]:
        """Modules with embedding LoRA."""
        return [m for m, f in self.by_module.items() if f.embedding]

    @property
    def lora_bias(self) -> list[str]:
        """Modules with a ``lora_B`` bias (``lora_bias=true``)."""
        return [m for m, f in self.by_module.items() if f.bias is not None]

    @property
    def extra(self) -> list[str]:
        """Tensors a llama.cpp LoRA adapter has no place for: DoRA magnitudes and every non-LoRA tensor."""
        magnitudes = [m + ".lora_magnitude_vector" for m, f in self.by_module.items() if f.magnitude is not None]
        return magnitudes + self.other

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A (r, in), B (out, r))`` of ``module`` as trained (fp32)."""
        f = self.by_module[module]
        return f.A, f.B

    def scale(self, module: str) -> float:
        """PEFT's scale of ``module``: ``alpha/r`` or ``alpha/√r`` after rank/alpha patterns.

        Raises:
            LorakitError: the file's rank of ``module`` is not the one its config gives.
        """
        f = self.by_module[module]
        expected = self.config.rank_for(module)
        if f.rank != expected:
            raise LorakitError(f"{self.folder}: {module} has rank {f.rank} in the file but {expected} by its "
                               "adapter_config.json (r / rank_pattern); the files do not belong together")
        return f.scale


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT adapter folder for export (through :func:`lorakit.adapters.peft_format.read_factors`).

    Raises:
        LorakitError: a missing folder or file, a config lorakit cannot read, or factors that do not
            pair up.
    """
    folder = Path(folder)
    config, by_module = read_factors(folder)
    shapes, _ = read_shapes(folder)  # the header only: the names of the tensors that are no LoRA part
    return Adapter(folder, config, by_module, [key for key in shapes if split_file_key(key) is None])
