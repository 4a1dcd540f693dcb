"""A PEFT LoRA adapter as a llama.cpp LoRA adapter GGUF that computes exactly what it trained.

llama.cpp adds ``scale · B (A x)`` to the output of each base tensor ``T`` that has factors
``T.lora_a`` (r, in) and ``T.lora_b`` (out, r) in the adapter file, with one rule for the scale::

    scale = user_scale · alpha / r      alpha: the file's adapter.lora.alpha, r: read off lora_b
            (user_scale, when alpha is 0)

PEFT's scale ``s`` is ``alpha_m / r_m`` per module, or ``alpha_m / sqrt(r_m)`` with rsLoRA, with
``alpha_m`` and ``r_m`` from ``alpha_pattern`` / ``rank_pattern``. One file-wide alpha cannot say
that, so each module's factors carry the difference: ``f = s / (alpha / r_m)`` folded in as
``√f`` into A and into B (``f = 1`` for plain LoRA without patterns: the factors are written as
trained). At ``user_scale`` 1 llama.cpp then computes ``s · B A`` for every module.

Notable:

- Row order: B's rows follow the base GGUF's row order (llama-family ``attn_q``/``attn_k``
  interleave each head's rotary halves; see :mod:`lorakit.export.layout`). For a GGUF base the
  order is checked against the file's own weights.
- Every tensor name must exist in the base with the adapted shape, checked before writing.
- What llama.cpp's LoRA cannot express is refused with a pointer to ``--merged``: DoRA, LoRA on
  embeddings or on a tied output head, ``modules_to_save``, ``lora_bias``, trained base biases
  and PiSSA adapters (which change the base weights themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.export.base import Base
from lorakit.export.gguf_file import Field, Planned, planned, write_gguf
from lorakit.export.trained import Adapter

MERGED_HINT = "export the merged model instead: lorakit export … --merged"


@dataclass
class AdapterExport:
    """What :func:`export_adapter` wrote."""

    path: Path
    arch: str
    alpha: float  # adapter.lora.alpha in the file
    tensors: int  # lora_a + lora_b tensors
    folded: dict[str, float] = field(default_factory=dict)  # module -> factor f folded in (only f != 1)
    f16_fallback: list[str] = field(default_factory=list)  # q8_0 asked, rows not a multiple of 32


def llama_cpp_scale(alpha: float, r: int) -> float:
    """The scale llama.cpp applies to ``B A`` at user scale 1 (its adapter loader's rule)."""
    return alpha / r if alpha else 1.0


def refusal(adapter: Adapter) -> str | None:
    """Why llama.cpp's LoRA form cannot hold ``adapter`` (None when it can)."""
    config = adapter.config
    if config.use_dora:
        return "it is a DoRA adapter (llama.cpp's LoRA has no magnitude vector)"
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights.startswith("pissa"):
        return ("it is a PiSSA adapter, which also changes the base weights (save it with pissa_to_lora=True "
                "for a plain LoRA of the original base)")
    if adapter.embeddings:
        return f"it has LoRA on embeddings ({', '.join(adapter.embeddings)})"
    if adapter.extra:
        names = ", ".join(sorted(adapter.extra)[:3])
        return (f"it holds tensors that are not LoRA factors ({names}…: modules_to_save, trained biases or "
                "embeddings)")
    if adapter.lora_bias:
        return f"it has lora_B biases ({', '.join(sorted(adapter.lora_bias)[:3])}; lora_bias=true)"
    return None


def export_adapter(adapter: Adapter, base: Base, out: Path, dtype: str = "f32") -> AdapterExport:
    """Write ``adapter`` as a llama.cpp LoRA adapter for ``base`` to ``out``.

    Args:
        adapter: the adapter, read with :func:`lorakit.export.trained.read_adapter`.
        base: the base model's GGUF layout (:func:`lorakit.export.base.load_base`).
        out: the ``.gguf`` file to write (atomically).
        dtype: ``f32`` (exact), ``f16``, ``bf16`` or ``q8_0`` for the factors.

    Returns:
        What was written.

    Raises:
        LorakitError: an adapter llama.cpp cannot take as LoRA (with a pointer to ``--merged``), a
            module or shape the base lacks, or an unwritable ``out``. Nothing is written then.
    """
    why = refusal(adapter)
    if why is not None:
        raise LorakitError(f"{adapter.folder}: cannot be a llama.cpp LoRA adapter: {why}; {MERGED_HINT}")
    layout = base.layout
    names = {}
    for module in adapter.modules:  # every name and shape first: nothing is computed for a wrong base
        A, B = adapter.factors(module)
        if layout.gguf_name(module) == "output.weight" and layout.tied_embeddings:
            raise LorakitError(f"{adapter.folder}: cannot be a llama.cpp LoRA adapter: it adapts the output head "
                               f"{module}, which this base ties to its embeddings; {MERGED_HINT}")
        names[module] = base.tensor_for(module, (B.shape[0], A.shape[1]), adapter.folder)
    base.check_rows(adapter.modules)
    alpha = float(adapter.config.lora_alpha)
    result = AdapterExport(path=out, arch=layout.arch, alpha=alpha, tensors=0)
    tensors: list[Planned] = []
    for module, name in names.items():
        A, B = adapter.factors(module)
        order = layout.row_order(name)
        if order is not None:
            B = B[order]  # (out, r): rows as the base GGUF stores the weight's rows
        f = adapter.scale(module) / llama_cpp_scale(alpha, A.shape[0])
        if f != 1.0:
            root = math.sqrt(abs(f))
            A, B = A * root, B * (root if f > 0 else -root)
            result.folded[module] = f
        for suffix, factor in ((".lora_a", A), (".lora_b", B)):
            plan = planned(name + suffix, factor, tuple(factor.shape), dtype)
            if dtype == "q8_0" and plan.type_name != "q8_0":
                result.f16_fallback.append(plan.name)
            tensors.append(plan)
    if not tensors:
        raise LorakitError(f"{adapter.folder}: the adapter file holds no LoRA factors to export")
    fields = _adapter_fields(adapter, alpha)
    write_gguf(out, layout.arch, fields, tensors)
    result.tensors = len(tensors)
    return result


def _adapter_fields(adapter: Adapter, alpha: float) -> list[Field]:
    import gguf

    T = gguf.GGUFValueType
    return [
        Field(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER, T.STRING),
        Field(gguf.Keys.General.NAME, adapter.folder.resolve().name, T.STRING),
        Field(gguf.Keys.Adapter.TYPE, "lora", T.STRING),
        Field(gguf.Keys.Adapter.LORA_ALPHA, alpha, T.FLOAT32),
    ]
