"""A GGUF base model converted once to a safetensors folder: atomically, under a file lock.

:mod:`lorakit.models` decides where a GGUF file's conversion lives (a folder in the cache named
after the file's identity); this module makes it, once:

- the weights are dequantised to fp32 and written with the config and the tokenizer into a
  temporary folder beside the destination, under a file lock (another process converting the
  same file waits, then reuses the result);
- a marker file (:data:`MARKER`) is written last, then the folder is renamed into place; a
  folder without the marker (an interrupted run, a stray ``.tmp-*``) is never used and is
  removed by the next conversion.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from lorakit._fs import atomic_folder
from lorakit.errors import LorakitError

CONVERSION_VERSION = 1  # bump when the converted folder's layout changes: old caches are redone
MARKER = "lorakit_conversion.json"  # written last into a converted folder; its presence = finished
LOCK_TIMEOUT_S = 1800.0  # how long to wait for another process's conversion of the same model


def is_complete(folder: Path) -> bool:
    """A finished conversion: its marker (written last) and its config are there."""
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def convert(gguf: Path, dest: Path, label: str) -> Path:
    """``dest`` holding the safetensors conversion of ``gguf``; converts under a lock if needed."""
    if is_complete(dest):
        return dest
    from filelock import FileLock, Timeout  # a dependency of huggingface_hub, so of transformers

    dest.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(dest.parent / f".{dest.name}.lock"))
    try:
        with lock.acquire(timeout=LOCK_TIMEOUT_S):
            if is_complete(dest):  # another process finished while we waited
                return dest
            _remove_leftovers(dest)
            print(f"lorakit: converting {gguf.name} to safetensors in {dest} "
                  "(once; later runs reuse it)", file=sys.stderr)
            with atomic_folder(dest, prefix=f".tmp-{dest.name}-{os.getpid()}-") as tmp:
                _write_converted(gguf, tmp, label)
                (tmp / MARKER).write_text(json.dumps(
                    {"source": str(gguf.resolve()), "size": gguf.stat().st_size, "spec": label,
                     "conversion": CONVERSION_VERSION, "created": time.time()}, indent=2))
    except Timeout as e:
        raise LorakitError(f"waited {LOCK_TIMEOUT_S:.0f} s for another process converting "
                           f"{gguf.name} into {dest}; if none is running, delete {lock.lock_file}"
                           ) from e
    return dest


def _remove_leftovers(dest: Path) -> None:
    """Under the lock: drop temp folders of dead conversions, and ``dest`` if it lacks the marker."""
    for stale in dest.parent.glob(f".tmp-{dest.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if dest.exists():
        shutil.rmtree(dest)


def _write_converted(gguf: Path, out: Path, label: str) -> None:
    """Dequantise ``gguf`` to fp32 and write config, safetensors weights and tokenizer into ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as e:
        raise LorakitError(f"cannot read GGUF file {gguf} (model {label!r}): {type(e).__name__}: "
                           f"{e}; it needs the `gguf` package (pip install gguf) and an "
                           "architecture that transformers' GGUF loader supports") from e
    state = loaded.state_dict()
    need = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in state.values()}.values())
    free = shutil.disk_usage(out).free
    if free < need + (64 << 20):
        raise LorakitError(f"converting {gguf.name} needs about {need / 2**30:.2f} GiB in {out.parent} "
                           f"but only {free / 2**30:.2f} GiB is free; free space or set LORAKIT_CACHE")
    # save_pretrained refuses a GGUF-loaded (quantizer-tagged) model: rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = fresh.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LorakitError(f"converting {gguf} (model {label!r}): the GGUF tensors do not fit "
                           f"the architecture (missing {result.missing_keys[:5]}, unexpected "
                           f"{result.unexpected_keys[:5]})")
    del loaded, state
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)
