"""``export_gguf``: an adapter folder to a llama.cpp GGUF file, as a LoRA adapter or merged."""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.export.adapter import AdapterExport, export_adapter
from lorakit.export.base import Base, check_trained_on, load_base
from lorakit.export.gguf_file import require_gguf
from lorakit.export.merged import MergedExport, export_merged
from lorakit.export.trained import read_adapter

DEFAULT_DTYPE = {False: "f32", True: "f16"}  # adapter: exact; merged: the size llama.cpp users expect


def export_gguf(adapter: str | Path, base: str | Base, out: str | Path, merged: bool = False, dtype: str | None = None,
                overwrite: bool = False) -> AdapterExport | MergedExport:
    """Write the adapter in ``adapter`` for llama.cpp: a LoRA adapter GGUF, or the merged model.

    Args:
        adapter: a PEFT adapter folder.
        base: the base model (a ``lorakit.models.resolve`` spec, or a :class:`Base` already loaded);
            for ``merged`` a GGUF file or alias.
        out: the ``.gguf`` file to write.
        merged: write the whole merged model instead of a LoRA adapter.
        dtype: ``f32``, ``f16``, ``bf16`` or ``q8_0``; default f32 for adapters, f16 merged.
        overwrite: replace ``out`` if it exists.

    Returns:
        What was written (:class:`AdapterExport` or :class:`MergedExport`).

    Raises:
        LorakitError: bad input of any kind (see the exporters); nothing is written then.
    """
    require_gguf()
    out = check_out_file(Path(out), overwrite)
    dtype = dtype or DEFAULT_DTYPE[merged]
    folder = Path(adapter)
    config_source = read_adapter(folder)  # fails early on a missing or broken folder
    export_base = base if isinstance(base, Base) else load_base(base)
    check_trained_on(export_base, config_source.config.base_model_name_or_path, folder)
    if merged:
        return export_merged(folder, export_base, out, dtype)
    return export_adapter(config_source, export_base, out, dtype)


def check_out_file(out: Path, overwrite: bool) -> Path:
    """``out`` if it is a ``.gguf`` path that may be written."""
    if out.suffix.lower() != ".gguf":
        raise LorakitError(f"--out {out}: a GGUF file path ending in .gguf is expected")
    if out.is_dir():
        raise LorakitError(f"--out {out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")
    return out
