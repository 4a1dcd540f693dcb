"""An adapter folder as the exporters see it: config, per-module factors, true scale, leftovers.

The PEFT file format itself (key names, scale rule, reading a folder) belongs to lorakit's adapter
format code; this module only sorts what it reads into what an export needs. :func:`_read_files`
is the one place that calls into that code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.adapters.config import LoraConfig
from lorakit.errors import LorakitError

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)\.weight$")
_LORA_BIAS = re.compile(r"^(?P<module>.+)\.lora_B\.bias$")
_EMBEDDING = re.compile(r"^(?P<module>.+)\.lora_embedding_(A|B)$")


@dataclass
class Adapter:
    """One adapter folder: its config and tensors, sorted by what they are."""

    folder: Path
    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A (r, in), B (out, r)), fp32
    embeddings: list[str] = field(default_factory=list)  # modules with embedding LoRA
    lora_bias: list[str] = field(default_factory=list)  # modules with a lora_B bias
    extra: list[str] = field(default_factory=list)  # other keys: modules_to_save, biases, magnitudes…

    @property
    def modules(self) -> list[str]:
        """The LoRA-adapted linear modules, in file order."""
        return list(self.lora)

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` of ``module`` as trained (fp32)."""
        return self.lora[module]

    def scale(self, module: str) -> float:
        """PEFT's scale of ``module``: ``alpha/r`` or ``alpha/√r`` after rank/alpha patterns."""
        from lorakit.adapters.lora import AdapterOptions

        r = self.lora[module][0].shape[0]
        expected = self.config.rank_for(module)
        if r != expected:
            raise LorakitError(f"{self.folder}: {module} has rank {r} in the file but {expected} by its "
                               "adapter_config.json (r / rank_pattern); the files do not belong together")
        return AdapterOptions(r=r, alpha=self.config.alpha_for(module), use_rslora=self.config.use_rslora).scaling


def read_adapter(folder: str | Path) -> Adapter:
    """Read a PEFT adapter folder for export.

    Raises:
        LorakitError: a missing folder or file, a config lorakit cannot read, or factors that do not
            pair up (A without B, ranks that differ).
    """
    folder = Path(folder)
    config, tensors = _read_files(folder)
    adapter = Adapter(folder=folder, config=config, lora={})
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if m := _LORA.match(key):
            halves.setdefault(m["module"], {})[m["part"]] = tensor
        elif m := _LORA_BIAS.match(key):
            adapter.lora_bias.append(m["module"])
        elif m := _EMBEDDING.match(key):
            if m["module"] not in adapter.embeddings:
                adapter.embeddings.append(m["module"])
        else:
            adapter.extra.append(key)
    for module, pair in halves.items():
        A, B = pair.get("A"), pair.get("B")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            shapes = {part: None if t is None else tuple(t.shape) for part, t in (("A", A), ("B", B))}
            raise LorakitError(f"{folder}: {module} has lora_A {shapes['A']} and lora_B {shapes['B']}; "
                               "the adapter file is inconsistent")
        adapter.lora[module] = (A.float(), B.float())
    return adapter


def _read_files(folder: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The folder's config, and its tensors keyed by module path (``model.layers.0.….lora_A.weight``)."""
    from lorakit.checkpoint import PREFIX, read_adapter_tensors

    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    config = LoraConfig.load(folder)
    tensors, _ = read_adapter_tensors(folder)
    return config, {k.removeprefix(PREFIX): v for k, v in tensors.items()}
