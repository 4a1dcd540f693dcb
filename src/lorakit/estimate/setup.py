"""The training setup being planned: its fields and checks, sizes and dtypes in bytes.

``Setup`` mirrors ``lorakit estimate``'s flags; ``parse_size`` reads ``--gpu`` (a size or a GPU name);
``nf4_bytes`` is the storage of one QLoRA base weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorakit.errors import LorakitError

PLAN_METHODS = ("full", "lora", "qlora", "dora", "spectrum")
"""What the planner plans for: the training methods, and full fine-tuning."""
ENGINES = ("lorakit", "peft")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = 1 << 30
# GPUs people name on the command line -> GiB (a "24 GB" card has 24 GiB).
GPU_ALIASES = {"t4": 16, "v100": 32, "a10": 24, "a10g": 24, "l4": 24, "3090": 24, "4090": 24, "5090": 32,
               "a6000": 48, "l40s": 48, "a100": 80, "h100": 80, "h200": 141, "b200": 192}


def nf4_bytes(numel: int) -> int:
    """Bytes of one tensor in bitsandbytes NF4 with double quantisation (≈4.127 bits/param).

    Two codes per byte; one 8-bit absmax per 64-value block; one fp32 absmax per 256 blocks plus
    an fp32 offset for the double quantisation of those absmaxes.
    """
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4


def parse_size(text: str) -> int:
    """``"24GB"``, ``"24GiB"``, ``"80G"``, ``"24000MB"``, ``"4090"`` or ``"24"`` -> bytes.

    GB and GiB both mean 2**30 bytes: GPU memory is sized in binary units, so a "24 GB" card
    holds 24 GiB. A bare number is GiB.

    Raises:
        LorakitError: the text is not a size or a known GPU.
    """
    t = text.strip().lower().replace(" ", "")
    if t in GPU_ALIASES:
        return GPU_ALIASES[t] * GIB
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(gib|gb|g|mib|mb|m|tib|tb|t)?", t)
    if m is None or float(m[1]) <= 0:
        raise LorakitError(f"--gpu {text!r}: expected a memory size such as 24GB, 80GiB or 16000MB, "
                           f"or a GPU name ({', '.join(sorted(GPU_ALIASES))})")
    scale = {"t": 1 << 40, "g": GIB, "m": 1 << 20}[(m[2] or "g")[0]]
    return int(float(m[1]) * scale)


@dataclass
class Setup:
    """One training configuration to plan for."""

    method: str = "lora"
    """full | lora | qlora | dora | spectrum."""
    rank: int = 16
    """LoRA/DoRA/QLoRA rank r."""
    batch: int = 1
    """Micro-batch size (sequences per forward pass)."""
    seq: int = 2048
    """Tokens per sequence (packed or padded length)."""
    grad_accum: int = 1
    """Gradient accumulation steps; above 1, gradients stay alive during the next forward pass."""
    dtype: str = "bf16"
    """Dtype of the base weights and of activations: bf16 | fp16 | fp32 (QLoRA: NF4 weights)."""
    adapter_dtype: str = "fp32"
    """Dtype of adapter weights (PEFT's default upcasts them to fp32)."""
    checkpointing: bool = False
    """Gradient checkpointing: keep each layer's input only, recompute the rest in backward."""
    targets: str | tuple[str, ...] = "all-linear"
    """LoRA targets: "all-linear" (never the output head) or module-name suffixes. On MoE models they
    resolve as lorakit (and PEFT) resolve them, experts included where PEFT includes them."""
    target_parameters: tuple[str, ...] = ()
    """Parameters adapted directly (PEFT's ``target_parameters``), e.g. the expert weights."""
    dropout: float = 0.0
    """LoRA dropout; above 0 every adapted layer keeps its own dropped-out input and mask."""
    top: float = 25.0
    """Spectrum: percentage of matrices trained per module type."""
    spectrum_embeddings: bool = True
    """Spectrum: also train the embeddings and output head (the reference does)."""
    engine: str = "lorakit"
    """``lorakit``: the step as ``lorakit train`` runs it (fused adapter layers that keep the input
    once and the dropped positions; the loss over answer tokens in chunks, no full logits).
    ``peft``: PEFT's adapter layers and the model's own loss (full fp32 logits)."""

    def __post_init__(self) -> None:
        if self.method not in PLAN_METHODS:
            raise LorakitError(f"--method {self.method!r}: expected one of {', '.join(PLAN_METHODS)}")
        for key in ("dtype", "adapter_dtype"):
            if getattr(self, key) not in DTYPE_BYTES:
                raise LorakitError(f"{key} {getattr(self, key)!r}: expected one of {', '.join(DTYPE_BYTES)}")
        for key in ("rank", "batch", "seq", "grad_accum"):
            if int(getattr(self, key)) < 1:
                raise LorakitError(f"--{key.replace('_', '-')} {getattr(self, key)}: expected a positive integer")
        if not 0.0 <= self.top <= 100.0:
            raise LorakitError(f"--top {self.top}: expected a percentage between 0 and 100")
        if self.engine not in ENGINES:
            raise LorakitError(f"--engine {self.engine!r}: expected one of {', '.join(ENGINES)}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"--dropout {self.dropout}: expected a value in [0, 1)")
        if isinstance(self.targets, list):
            self.targets = tuple(self.targets)
        self.target_parameters = tuple(self.target_parameters or ())

