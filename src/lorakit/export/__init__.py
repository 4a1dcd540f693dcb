"""Export for llama.cpp and Ollama: PEFT adapters as GGUF files that compute what was trained.

- :func:`export_gguf` — a llama.cpp LoRA adapter GGUF (the true PEFT scale folded in, B's rows
  in the base GGUF's order, every name and shape checked against the base), or with
  ``merged=True`` the whole merged model as one GGUF file;
- :func:`export_ollama` — a folder with that GGUF and a ``Modelfile`` for ``ollama create``.

The pieces: :mod:`~lorakit.export.layout` (how a base lays out its weights in GGUF),
:mod:`~lorakit.export.base` (the ``--base M`` of an export), :mod:`~lorakit.export.trained`
(an adapter folder, sorted for export), :mod:`~lorakit.export.adapter` (the LoRA form),
:mod:`~lorakit.export.merged` (the merged form), :mod:`~lorakit.export.gguf_file` (encodings and
atomic writing). Reads and writes GGUF with the ``gguf`` package from PyPI only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the same names as _LAZY, for type checkers and editors
    from lorakit.export.adapter import AdapterExport as AdapterExport
    from lorakit.export.llama_cpp import export_gguf as export_gguf
    from lorakit.export.merged import MergedExport as MergedExport
    from lorakit.export.ollama import OllamaExport as OllamaExport, export_ollama as export_ollama

_LAZY = {
    "export_gguf": "lorakit.export.llama_cpp",
    "export_ollama": "lorakit.export.ollama",
    "AdapterExport": "lorakit.export.adapter",
    "MergedExport": "lorakit.export.merged",
    "OllamaExport": "lorakit.export.ollama",
}
__all__ = sorted(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
