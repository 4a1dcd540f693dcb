"""An Ollama model folder: the GGUF file(s) and a ``Modelfile``, ready for ``ollama create``.

Adapter form::

    FROM /path/to/base.gguf          the base GGUF (Ollama needs the file the adapter was made for)
    ADAPTER ./adapter.gguf           the llama.cpp LoRA adapter, beside the Modelfile
    PARAMETER stop "<|im_end|>"      the chat template's end-of-turn and start-of-turn tokens

Merged form: ``FROM ./model.gguf`` and the same stops. Ollama reads the chat template from the
GGUF's ``tokenizer.chat_template``. The folder is built under a temporary name and renamed into
place when complete.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit._fs import atomic_folder
from lorakit.errors import LorakitError
from lorakit.export.base import Base, load_base
from lorakit.export.gguf_file import require_gguf
from lorakit.export.llama_cpp import export_gguf
from lorakit.models import load_tokenizer

MODELFILE = "Modelfile"
_ASSISTANT = "LORAKIT-ASSISTANT-TURN"
_NEXT_USER = "LORAKIT-NEXT-USER-TURN"


@dataclass
class OllamaExport:
    """What :func:`export_ollama` wrote."""

    folder: Path
    gguf: Path  # the adapter or merged GGUF inside the folder
    modelfile: Path
    stops: list[str]
    command: str  # the `ollama create` command to run


def stop_tokens(tokenizer: Any) -> list[str]:
    """The special tokens the chat template puts after an assistant message, up to the next user
    message (end of turn, start of the next turn), then the end-of-sequence token."""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    stops: list[str] = []
    if getattr(tokenizer, "chat_template", None):
        conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": _ASSISTANT},
                        {"role": "user", "content": _NEXT_USER}]
        try:
            text = tokenizer.apply_chat_template(conversation, tokenize=False)
        except Exception:  # a template that raises for this conversation: fall back to eos
            text = ""
        between = text.partition(_ASSISTANT)[2].partition(_NEXT_USER)[0]
        if special:
            pattern = "|".join(re.escape(t) for t in sorted(special, key=len, reverse=True))
            stops += [t for t in re.findall(pattern, between) if t not in stops]
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    return stops


def modelfile(source: str, adapter: str | None, stops: list[str], note: str) -> str:
    """The text of a Modelfile."""
    lines = [f"# {note}", f"FROM {source}"]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    lines += [f'PARAMETER stop "{_quoted(s)}"' for s in stops]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def export_ollama(adapter: str | Path, base: Any, out: str | Path, merged: bool = False, dtype: str | None = None,
                  overwrite: bool = False) -> OllamaExport:
    """Write an Ollama model folder for ``adapter`` on ``base``.

    Args:
        adapter: a PEFT adapter folder.
        base: the base model, as a GGUF file or built-in alias (Ollama runs GGUF files), or a loaded
            :class:`lorakit.export.base.Base`.
        out: the folder to write (replaced only with ``overwrite``).
        merged: put the merged model in the folder instead of a LoRA adapter.
        dtype: as for :func:`lorakit.export.llama_cpp.export_gguf`.
        overwrite: replace ``out`` if it exists.

    Raises:
        LorakitError: a base without a GGUF file, ``out`` exists, or any export error.
    """

    require_gguf()
    out = Path(out)
    if out.exists() and not overwrite:
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LorakitError(f"--out {out} is a file; an Ollama export is a folder")
    export_base = base if isinstance(base, Base) else load_base(base)
    if export_base.gguf is None:
        raise LorakitError(f"--to ollama needs the base model as a GGUF file (a .gguf path or a built-in alias), not "
                           f"{export_base.spec!r}: the Modelfile's FROM names that file")
    name = "model.gguf" if merged else "adapter.gguf"
    try:
        with atomic_folder(out) as tmp:
            export_gguf(adapter, export_base, tmp / name, merged=merged, dtype=dtype)
            stops = stop_tokens(load_tokenizer(export_base.spec))
            source = f"./{name}" if merged else str(export_base.gguf.resolve())
            note = f"written by lorakit export from the adapter {Path(adapter).resolve()}"
            (tmp / MODELFILE).write_text(modelfile(source, None if merged else f"./{name}", stops, note))
    except OSError as err:
        raise LorakitError(f"cannot write {out}: {err.strerror or err}; choose a writable --out") from None
    model = re.sub(r"[^a-z0-9._-]+", "-", out.resolve().name.lower()).strip("-.") or "lorakit-adapter"
    return OllamaExport(folder=out, gguf=out / name, modelfile=out / MODELFILE, stops=stops,
                        command=f"ollama create {model} -f {out / MODELFILE}")
