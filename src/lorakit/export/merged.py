"""The base model with an adapter merged in, as one GGUF model file that llama.cpp runs on its own.

For what llama.cpp's LoRA cannot hold — DoRA, LoRA on embeddings or the output head,
``modules_to_save``, trained biases, PiSSA — and for anyone who wants one file. The merge is
lorakit's own (:func:`lorakit.merging.merge_and_unload`, fp32), so the file computes what the
adapter computes in lorakit.

The base GGUF is the template: every metadata field (hyper-parameters, tokenizer, chat template)
is copied from it, every tensor is written in its order, with its name and row order (checked
against its weights), in the chosen encoding; tensors without a transformers counterpart (e.g.
``rope_freqs``) are copied as they are. When the merge unties a tied output head (an adapter on
``lm_head`` or on the embeddings of SmolLM2, Gemma, …), ``output.weight`` is added.

Notable: a quantised base (the built-in SmolLM2 is Q4_1) is merged into its dequantised weights;
the merged file in f16 or q8_0 is larger than the base and holds those weights plus the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit.adapter_io import load_adapter
from lorakit.errors import LorakitError
from lorakit.export.base import Base
from lorakit.export.gguf_file import FILE_TYPES, Field, Planned, copied_fields, planned, write_gguf
from lorakit.export.layout import check_row_order, tensor_kind
from lorakit.merging import merge_and_unload
from lorakit.models import load_model


@dataclass
class MergedExport:
    """What :func:`export_merged` wrote."""

    path: Path
    arch: str
    tensors: int
    copied: list[str]  # base tensors copied unchanged (no transformers counterpart)
    added: list[str]  # tensors the base file did not have (an untied output head)


def export_merged(adapter: str | Path | None, base: Base, out: Path, dtype: str = "f16") -> MergedExport:
    """Merge ``adapter`` into ``base`` and write the whole model as GGUF to ``out``.

    Args:
        adapter: a PEFT adapter folder; None writes the base itself (in ``dtype``).
        base: a base with a GGUF file (the template for metadata and layout).
        out: the ``.gguf`` file to write (atomically).
        dtype: ``f16``, ``bf16``, ``q8_0`` or ``f32`` for the 2-D weights (norms stay f32).

    Raises:
        LorakitError: a base without a GGUF file, an adapter that does not fit it, an unwritable
            ``out``. Nothing is written then.
    """
    import gguf

    if base.gguf is None:
        raise LorakitError(
            f"--merged needs the base model as a GGUF file (a .gguf path or a built-in alias), not {base.spec!r}: "
            "the merged file copies its tokenizer, chat template and hyper-parameters from that file, so that "
            "llama.cpp tokenizes and prompts exactly as for the base")
    layout = base.layout
    model = load_model(base.spec, dtype=torch.float32, device="cpu")
    names = _gguf_names(layout, model.state_dict())
    reader = layout.reader
    state = model.state_dict()
    one_per_kind = {}
    for gguf_name, hf_name in names.items():
        if gguf_name in layout.tensors and state[hf_name].dim() == 2:
            one_per_kind.setdefault(tensor_kind(gguf_name), (gguf_name, hf_name))
    check_row_order(layout, state.__getitem__, dict(one_per_kind.values()))
    if adapter is not None:
        try:
            load_adapter(model, adapter)
        except LorakitError as err:
            raise LorakitError(f"{err} (base {base.spec!r})") from None
        model = merge_and_unload(model)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    merged = model.state_dict()
    names = _gguf_names(layout, merged, tied=tied)
    tensors: list[Planned] = []
    copied: list[str] = []
    for t in reader.tensors:
        if t.name in names:
            tensors.append(_planned(layout, t.name, merged[names[t.name]], dtype))
        else:  # no transformers counterpart (e.g. rope_freqs): as stored
            shape = tuple(int(n) for n in reversed(t.shape.tolist()))
            tensors.append(Planned(t.name, shape, t.tensor_type, lambda t=t: np.array(t.data)))
            copied.append(t.name)
    added = [name for name in names if name not in layout.tensors]
    tensors += [_planned(layout, name, merged[names[name]], dtype) for name in added]
    fields = copied_fields(reader, skip={gguf.Keys.General.FILE_TYPE})
    fields.append(Field(gguf.Keys.General.FILE_TYPE, FILE_TYPES[dtype], gguf.GGUFValueType.UINT32))
    write_gguf(out, layout.arch, fields, tensors)
    return MergedExport(path=out, arch=layout.arch, tensors=len(tensors), copied=copied, added=added)


def _gguf_names(layout: Any, state: dict[str, torch.Tensor], tied: bool = True) -> dict[str, str]:
    """GGUF tensor name -> transformers state key, for every key that has a GGUF counterpart."""
    mapping = layout.name_map()
    names = {}
    for key, tensor in state.items():
        if key == "lm_head.weight" and tied:
            continue  # the tied head is token_embd in GGUF
        gguf_name = mapping.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            continue
        want = layout.tensors.get(gguf_name)
        if want is not None and tuple(want) != tuple(tensor.shape):
            raise LorakitError(f"{layout.source}: {gguf_name} is {tuple(want)} but the model's {key} is "
                               f"{tuple(tensor.shape)}; the GGUF file and its converted weights disagree")
        names[gguf_name] = key
    return names


def _planned(layout: Any, name: str, weight: torch.Tensor, dtype: str) -> Planned:
    """``weight`` under GGUF name ``name``, rows in the base file's order, encoded while written."""
    order = layout.row_order(name) if name in layout.tensors else None
    return planned(name, lambda: weight if order is None else weight[order], tuple(weight.shape), dtype)
