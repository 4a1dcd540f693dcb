"""Writing a GGUF file with the ``gguf`` package: tensor encodings, copied metadata, atomic output.

Notable:

- Tensors are planned first (name, shape, encoding) and encoded one at a time while the file is
  written, so a merged model never exists twice in memory, and what is written is the tensor's
  value at that moment (gguf's writer would otherwise keep a view of every array until the end).
- Encodings: ``f32``, ``f16``, ``bf16`` or ``q8_0`` (gguf's bit-exact port of ggml's Q8_0). Q8_0
  packs rows in blocks of 32; a tensor whose rows are not a multiple of 32 long (a LoRA B of rank
  16, say) is written as f16 instead, as llama.cpp's own converter does. 1-D tensors (norms,
  biases) stay f32, which is what llama.cpp expects of them.
- The file is written beside its destination under a temporary name and renamed into place
  (:func:`lorakit._fs.atomic_write`); a failed write leaves nothing behind, and folders created
  for it are removed again.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lorakit._fs import atomic_write
from lorakit.errors import LorakitError

DTYPES = ("f32", "f16", "bf16", "q8_0")
# general.file_type values (llama.cpp's llama_ftype) for a file mostly in that encoding
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


@dataclass
class Field:
    """One metadata key/value as the gguf writer takes it."""

    key: str
    value: Any
    type: Any  # gguf.GGUFValueType
    sub_type: Any = None  # element type of an array


@dataclass
class Planned:
    """A tensor to write: its name, shape (numpy order), GGML type, and how to make its data."""

    name: str
    shape: tuple[int, ...]
    type: Any  # gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]  # the encoded data (called once, while writing)

    @property
    def nbytes(self) -> int:
        import gguf

        return math.prod(gguf.quant_shape_to_byte_shape(self.shape, self.type))

    @property
    def type_name(self) -> str:
        return self.type.name.lower()


def require_gguf() -> None:
    """Raise a LorakitError saying how to install the ``gguf`` package when it is missing."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LorakitError("lorakit export reads and writes GGUF with the `gguf` package, which is not installed: "
                           "pip install 'lorakit[gguf]' (or pip install gguf)") from None


def ggml_type(shape: tuple[int, ...], dtype: str) -> Any:
    """The GGML type a tensor of ``shape`` gets for the requested ``dtype`` (see the module docstring)."""
    import gguf

    if dtype not in DTYPES:
        raise LorakitError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or dtype == "f32":
        return Q.F32
    if dtype == "q8_0":
        return Q.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0 else Q.F16
    return Q.BF16 if dtype == "bf16" else Q.F16


def planned(name: str, tensor: torch.Tensor | Callable[[], torch.Tensor], shape: tuple[int, ...],
            dtype: str) -> Planned:
    """Plan ``tensor`` (or a function making it, called at write time) in encoding ``dtype``."""
    kind = ggml_type(tuple(shape), dtype)
    return Planned(name, tuple(shape), kind, lambda: encode(tensor() if callable(tensor) else tensor, kind))


def encode(tensor: torch.Tensor, kind: Any) -> np.ndarray:
    """``tensor`` (any float dtype) as the data of GGML type ``kind`` (a fresh array)."""
    import gguf

    array = np.array(tensor.detach().to(torch.float32).cpu().numpy(), dtype=np.float32, copy=True)
    Q = gguf.GGMLQuantizationType
    if kind == Q.F32:
        return array
    if kind == Q.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, kind)


def copied_fields(reader: Any, skip: set[str] | frozenset[str] = frozenset()) -> list[Field]:
    """Every metadata field of an open ``GGUFReader`` except the header and ``skip``."""
    import gguf

    skip = set(skip) | set(_HEADER_FIELDS) | {"general.architecture"}
    fields = []
    for key, found in reader.fields.items():
        if key in skip:
            continue
        main = found.types[0]
        sub = found.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        fields.append(Field(key, found.contents(), main, sub))
    return fields


def write_gguf(out: Path, arch: str, fields: list[Field], tensors: list[Planned]) -> None:
    """Write a GGUF file atomically: ``fields`` as metadata, then ``tensors`` in order.

    Raises:
        LorakitError: the destination cannot be written (its folder, permissions, disk space);
            nothing is left behind.
    """
    import gguf

    def write(path: str) -> None:
        writer = gguf.GGUFWriter(path, arch)
        for f in fields:
            writer.add_key_value(f.key, f.value, f.type, f.sub_type)
        for t in tensors:
            # a float32 "tensor dtype" with a raw type keeps `shape` as the logical (not byte) shape
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.type)
        try:
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in tensors:
                data = t.make()
                if data.nbytes != t.nbytes:
                    raise AssertionError(f"{t.name}: encoded {data.nbytes} bytes, planned {t.nbytes}")
                writer.write_tensor_data(data)
        finally:
            writer.close()

    created = _make_parents(out)
    try:
        atomic_write(out, write)  # a failed write is a LorakitError naming out (lorakit._fs.write_failures)
    except BaseException as err:
        for folder in created:  # the folders made for out go too: nothing is left behind
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(err, OSError):
            reason = err.strerror or str(err)
            raise LorakitError(f"cannot write {out}: {reason}; choose a writable --out (nothing was written)") from None
        raise


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out``; the ones created, deepest first."""
    missing = []
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise LorakitError(f"cannot write {out}: {folder} is not a writable folder; choose another --out")
    made = []
    try:
        for path in reversed(missing):
            path.mkdir()
            made.insert(0, path)
    except OSError as err:
        for path in made:
            path.rmdir()
        raise LorakitError(f"cannot create {path} for {out}: {err.strerror or err}") from None
    return made
