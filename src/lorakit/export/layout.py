"""How a base model's weights are laid out in GGUF: architecture, tensor names, shapes, row order.

A LoRA adapter for llama.cpp must name each factor after the base GGUF's tensor and lay out B's
rows as that tensor lays out its rows. Two sources give the layout:

- a GGUF file (``--base model.gguf`` or a built-in alias): its metadata and tensor table are read
  as they are, and the row order of every kind of adapted tensor is *checked* against the file's
  own weights (dequantised) — nothing about the layout is assumed;
- a transformers folder: the layout llama.cpp's converter would produce, derived from the config
  for the architectures in :data:`ARCHITECTURES` only.

Row order: llama-family GGUF files store ``attn_q``/``attn_k`` with each head's rotary halves
interleaved (llama.cpp's "normal" RoPE pairs dimensions 2i and 2i+1; transformers' Llama pairs i
and i + d/2). For a head of ``d`` rows, GGUF row ``2i + j`` is transformers row ``j·d/2 + i``::

    transformers head rows:  x0 x1 … x(d/2-1) | y0 y1 … y(d/2-1)
    GGUF head rows:          x0 y0 x1 y1 … x(d/2-1) y(d/2-1)

Tensor shapes are given in PyTorch/numpy order, (out, in); GGUF's own ``ne`` order is reversed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError


@dataclass(frozen=True)
class Arch:
    """What llama.cpp's converter does with one transformers architecture."""

    gguf: str  # general.architecture
    rope_rows: bool  # attn_q / attn_k rows interleaved per head (llama-family)


# transformers model_type -> GGUF layout, for bases given as transformers folders. A GGUF base
# needs no entry: its layout is read from the file.
ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("llama", rope_rows=True),
    "mistral": Arch("llama", rope_rows=True),
    "qwen2": Arch("qwen2", rope_rows=False),
    "qwen3": Arch("qwen3", rope_rows=False),
}

ROPE_KINDS = ("attn_q", "attn_k")


@dataclass
class Layout:
    """A base model as llama.cpp sees it."""

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    tensors: dict[str, tuple[int, ...]]  # GGUF tensor name -> shape (numpy order)
    source: str  # what the layout was read from, for messages
    gguf: Path | None = None  # the base GGUF file, when there is one
    rope_rows: dict[str, bool] = field(default_factory=dict)  # tensor kind -> rows interleaved
    tied_embeddings: bool = False  # no separate output.weight: the head reuses token_embd
    reader: Any = None  # the open gguf.GGUFReader of ``gguf`` (opening one parses all metadata: slow)
    _names: Any = field(default=None, repr=False)

    def name_map(self) -> Any:
        """gguf's transformers-name -> GGUF-name map for this architecture (built once)."""
        import gguf

        if self._names is None:
            arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.arch), None)
            if arch is None:
                raise LorakitError(f"{self.source}: GGUF architecture {self.arch!r} is unknown to the installed gguf "
                                   "package; upgrade it (pip install -U gguf)")
            self._names = gguf.get_tensor_name_map(arch, self.n_layers)
        return self._names

    def gguf_name(self, module: str) -> str | None:
        """The GGUF weight name of transformers module ``module`` (``….q_proj`` -> ``blk.N.attn_q.weight``)."""
        name = self.name_map().get_name(module)
        return None if name is None else name + ".weight"

    def row_order(self, gguf_name: str) -> torch.Tensor | None:
        """Indices ``order`` with GGUF row k == transformers row ``order[k]``; None when they agree."""
        kind = tensor_kind(gguf_name)
        if not self.rope_rows.get(kind, False):
            return None
        heads = self.n_head if kind == "attn_q" else self.n_head_kv
        return rope_row_order(self.tensors[gguf_name][0], heads)


def tensor_kind(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``attn_q``; ``token_embd.weight`` -> ``token_embd``."""
    return re.sub(r"^blk\.\d+\.", "", gguf_name).removesuffix(".weight").removesuffix(".bias")


def rope_row_order(rows: int, heads: int) -> torch.Tensor:
    """Row indices that interleave each head's two rotary halves (see the module docstring)."""
    if rows % (2 * heads):
        raise LorakitError(f"cannot interleave {rows} rows over {heads} heads (head size must be even)")
    half = rows // heads // 2
    head, i, j = torch.meshgrid(torch.arange(heads), torch.arange(half), torch.arange(2), indexing="ij")
    return (head * 2 * half + j * half + i).reshape(-1)


# -- from a GGUF file ------------------------------------------------------------------------------


def read_gguf_layout(path: Path) -> Layout:
    """The layout of the GGUF model file ``path`` (metadata and tensor table only; row order unchecked).

    Raises:
        LorakitError: not a GGUF file, not a model (e.g. an adapter), or missing hyper-parameters.
    """
    reader = open_gguf(path)
    kind = field_value(reader, "general.type", "model")
    if kind != "model":
        raise LorakitError(f"{path}: general.type is {kind!r}; the base must be a GGUF model file, not an {kind}")
    arch = field_value(reader, "general.architecture")
    if not arch:
        raise LorakitError(f"{path}: no general.architecture in the GGUF metadata")

    def number(key: str) -> int:
        value = field_value(reader, f"{arch}.{key}")
        if value is None:
            raise LorakitError(f"{path}: the GGUF metadata lacks {arch}.{key}")
        return int(value)

    n_head = number("attention.head_count")
    n_head_kv = field_value(reader, f"{arch}.attention.head_count_kv")
    tensors = {t.name: tuple(int(n) for n in reversed(t.shape.tolist())) for t in reader.tensors}
    return Layout(arch=arch, n_layers=number("block_count"), n_head=n_head,
                  n_head_kv=int(n_head_kv) if n_head_kv is not None else n_head, tensors=tensors,
                  source=str(path), gguf=path, tied_embeddings="output.weight" not in tensors, reader=reader)


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` on ``path`` (memory-mapped), or a LorakitError saying why not."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except FileNotFoundError:
        raise LorakitError(f"{path}: no such GGUF file") from None
    except Exception as err:  # gguf raises ValueError / struct errors for foreign or truncated files
        raise LorakitError(f"{path}: not a readable GGUF file ({type(err).__name__}: {err})") from None


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    """The value of metadata field ``key`` (a str, number, bool or list), or ``default``."""
    found = reader.fields.get(key)
    return default if found is None else found.contents()


def check_row_order(layout: Layout, hf_weights: Any, kinds: dict[str, str]) -> None:
    """Find, for each tensor kind, whether the GGUF file interleaves its rows, from the weights.

    Args:
        layout: a layout read from a GGUF file; ``rope_rows`` is filled in.
        hf_weights: ``get(name) -> torch.Tensor``: the base's transformers weights, converted from
            that same GGUF file (so the two hold the same numbers).
        kinds: GGUF tensor name -> transformers weight name, one tensor per kind to check.

    Raises:
        LorakitError: a tensor whose rows match the transformers weight in no known order.
    """
    import gguf

    by_name = {t.name: t for t in layout.reader.tensors}
    for gguf_name, hf_name in kinds.items():
        tensor = by_name[gguf_name]
        stored = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        stored = stored.reshape(layout.tensors[gguf_name]).float()
        weight = hf_weights(hf_name).float()
        kind = tensor_kind(gguf_name)
        candidates = [False, True] if kind in ROPE_KINDS else [False]
        for interleaved in candidates:
            layout.rope_rows[kind] = interleaved
            order = layout.row_order(gguf_name)
            if torch.equal(stored, weight if order is None else weight[order]):
                break
        else:
            layout.rope_rows.pop(kind, None)
            raise LorakitError(
                f"{layout.source}: the rows of {gguf_name} match the converted weight {hf_name} in no order lorakit "
                "knows (as stored, or llama.cpp's per-head rotary interleave); lorakit cannot lay out an adapter "
                "for this file — export with --merged instead")


# -- from a transformers config ----------------------------------------------------------------------


def config_layout(config: Any, source: str) -> Layout:
    """The layout llama.cpp's converter gives a transformers model with ``config``.

    Raises:
        LorakitError: an architecture not in :data:`ARCHITECTURES` (pass its GGUF file instead).
    """
    from transformers import AutoModelForCausalLM

    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        raise LorakitError(
            f"{source}: lorakit derives the GGUF layout of {', '.join(sorted(ARCHITECTURES))} models from their "
            f"config, not of {model_type!r} ones; pass the base model's GGUF file as --base (the layout is then "
            "read from it)")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layout = Layout(arch=arch.gguf, n_layers=config.num_hidden_layers, n_head=config.num_attention_heads,
                    n_head_kv=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                    tensors={}, source=source, tied_embeddings=tied,
                    rope_rows={kind: arch.rope_rows for kind in ROPE_KINDS})
    mapping = layout.name_map()
    for name, shape in shapes.items():
        if tied and name == "lm_head.weight":
            continue
        gguf_name = mapping.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is not None:
            layout.tensors[gguf_name] = shape
    return layout
