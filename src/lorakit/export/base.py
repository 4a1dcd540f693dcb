"""The base model ``M`` of an export: its GGUF layout, its GGUF file when it has one, its weights.

``M`` is what every lorakit command takes (:func:`lorakit.models.resolve`). A built-in alias or a
``.gguf`` path *is* a GGUF file: the layout is read from it and the row order checked against its
weights. A transformers folder or hub id gets the layout llama.cpp's converter would give it
(:func:`lorakit.export.layout.config_layout`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.export.layout import ARCHITECTURES, Layout, check_row_order, config_layout, read_gguf_layout, tensor_kind
from lorakit.models import gguf_source, load_model_config, resolve


@dataclass
class Base:
    """An export's base model."""

    spec: str
    layout: Layout
    _checked: set[str] = field(default_factory=set)

    @property
    def gguf(self) -> Path | None:
        """The base's GGUF file (None for a transformers base)."""
        return self.layout.gguf

    def tensor_for(self, module: str, shape: tuple[int, int], source: Path) -> str:
        """The GGUF weight that ``module`` adapts, checked to exist with ``shape`` (out, in).

        Raises:
            LorakitError: the base has no such tensor, or another shape: the adapter belongs to
                another base model.
        """
        layout = self.layout
        name = layout.gguf_name(module)
        if name is None or name not in layout.tensors:
            known = f" (it has {name!r} in no tensor)" if name else ""
            raise LorakitError(
                f"{source}: module {module} has no tensor in the {layout.arch} base {layout.source}{known}; "
                "the adapter was trained on another base model — export it with the base it was trained on")
        if tuple(layout.tensors[name]) != tuple(shape):
            raise LorakitError(
                f"{source}: module {module} is {shape[0]}×{shape[1]} (out×in) in the adapter but {name} is "
                f"{layout.tensors[name][0]}×{layout.tensors[name][1]} in the base {layout.source}; the adapter "
                "was trained on another base model — export it with the base it was trained on")
        return name

    def check_rows(self, modules: list[str]) -> None:
        """For a GGUF base: learn and check the row order of each kind of tensor ``modules`` adapt.

        One tensor per kind (``attn_q``, ``ffn_down``, …) is compared with the base's transformers
        weights, which were converted from the same file: they hold the same numbers, so the
        comparison is exact.
        """
        if self.gguf is None:
            return
        todo: dict[str, str] = {}
        for module in modules:
            name = self.layout.gguf_name(module)
            kind = tensor_kind(name) if name else None
            if name in self.layout.tensors and kind not in self._checked and kind not in {tensor_kind(n) for n in todo}:
                todo[name] = module + ".weight"
        if todo:
            check_row_order(self.layout, _weights(self.spec), todo)
            self._checked.update(tensor_kind(n) for n in todo)


def load_base(spec: str) -> Base:
    """The export base ``spec``: a built-in alias, a ``.gguf`` file, a folder or a cached hub id.

    Raises:
        LorakitError: ``spec`` cannot be found, is not a GGUF model, or (as a transformers model)
            has an architecture whose GGUF layout lorakit does not derive.
    """

    path = gguf_source(spec)
    if path is not None:
        return Base(spec, read_gguf_layout(path))
    return Base(spec, config_layout(load_model_config(spec), spec))


def check_trained_on(base: Base, recorded: str | None, source: Path) -> None:
    """Refuse a base of another architecture than the one the adapter records it was trained on.

    Only when the recorded base can be found offline and its architecture is one lorakit maps
    (:data:`ARCHITECTURES`); shapes are checked for every tensor in any case.
    """

    if not recorded or recorded == base.spec:
        return
    try:
        path = gguf_source(recorded)
        if path is not None and base.gguf is not None and path.resolve() == base.gguf.resolve():
            return
        known = ARCHITECTURES.get(getattr(load_model_config(recorded), "model_type", None))
    except LorakitError:
        return
    if known is not None and known.gguf != base.layout.arch:
        raise LorakitError(
            f"{source}: the adapter was trained on {recorded!r}, a {known.gguf} model, but the base "
            f"{base.layout.source} is a {base.layout.arch} model; llama.cpp refuses an adapter for another "
            "architecture — export it with the base it was trained on")


def _weights(spec: str) -> Any:
    """``get(name) -> tensor`` over the safetensors weights of ``spec``'s resolved folder."""
    from safetensors import safe_open


    folder = resolve(spec)
    where: dict[str, Path] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            where.update({key: path for key in f.keys()})

    def get(name: str) -> torch.Tensor:
        if name not in where:
            raise LorakitError(f"base {spec!r}: no weight {name} in {folder}")
        with safe_open(str(where[name]), "pt") as f:
            return f.get_tensor(name)

    return get
