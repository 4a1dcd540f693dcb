"""A standalone transformers model folder from a base and adapters: ``merge_to_folder``, what
``lorakit merge`` runs.

The base weights with the adapters' updates folded in, written as safetensors shards with the config,
generation config, tokenizer and chat template, so that ``AutoModelForCausalLM.from_pretrained(DIR)``
(and vLLM, llama.cpp's converter, …) load it with no trace of LoRA. The merge itself is
:func:`lorakit.merging.merge_and_unload`; this module adds loading the base, the dtype, quantised
bases and the folder.

Notable:

- The sum is taken in fp32 (the base is loaded in fp32), then cast once to ``--dtype`` (default:
  the base's own dtype): no double rounding.
- Tied embeddings (SmolLM2, Gemma, GPT-2): when an adapter changes the input embedding or the
  output head, the two are untied before merging and the saved config says
  ``tie_word_embeddings: false``, so a reload does not tie them back (and drop the update).
- Several ``--adapter`` flags merge their sum (as if all were active). To weight them, build one
  adapter first with ``lorakit combine``.
- The folder is written under a temporary name beside ``--out`` and renamed when complete.
- A base given as a ``.gguf`` file (or the built-in alias) is quantised: lorakit dequantises it
  to fp32 once, and the merge is onto those dequantised weights; a warning says so.
- A base saved in 4 bits with bitsandbytes (``quantization_config`` with ``load_in_4bit``) is
  dequantised: adapted layers are merged into their dequantised weights, every other 4-bit layer
  is dequantised too, and the result is a plain fp32-computed model (a warning says that it
  carries the NF4 rounding of the original weights). Other quantisation methods are refused.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit import __version__
from lorakit._fs import atomic_folder
from lorakit.adapter_io import load_adapter
from lorakit.adapters.peft_format import CONFIG_NAME
from lorakit.adapters.quant import dense_copy, is_quantized
from lorakit.errors import LorakitError
from lorakit.inject import set_active, set_submodule
from lorakit.merging import merge_and_unload
from lorakit.models import MARKER, load_model, load_model_config, load_tokenizer, resolve
from lorakit.models.loading import _parse_dtype

INFO_NAME = "lorakit_merge.json"
"""The file in the merged folder that records the base, the adapters and the dtype."""


def merge_to_folder(base: str, adapters: list[str | Path], out: str | Path, dtype: str | None = None,
                    max_shard_size: str | int = "5GB", overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Merge ``adapters`` into ``base`` and save a standalone transformers model folder.

    Args:
        base: base model spec (``lorakit.models.resolve``).
        adapters: adapter folders; their updates are summed.
        out: output folder.
        dtype: ``bf16``, ``fp16`` or ``fp32`` for the saved weights; None = the base's dtype.
        max_shard_size: largest safetensors shard (``"5GB"``, or bytes).
        overwrite: replace ``out`` if it exists.
        log: called with progress messages (default: silent).

    Returns:
        ``out``.

    Raises:
        LorakitError: missing/unfit adapters, an unknown base, a bitsandbytes-quantised base, or
            ``out`` exists without ``overwrite``. Nothing is left in ``out`` on error.
    """
    log = log or (lambda message: None)
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise LorakitError(f"{out} already exists; choose another --out or pass --force to replace it")
    _check_shard_size(max_shard_size)
    for folder in adapters:  # fail before the (slow) model load
        if not (Path(folder) / CONFIG_NAME).is_file():
            raise LorakitError(f"{folder}: no {CONFIG_NAME}; not an adapter folder")
    config = load_model_config(base)
    quantised = _check_quantisation(base, config)
    target = _parse_dtype(dtype) if dtype else _base_dtype(config)
    folder = resolve(base)
    if (folder / MARKER).is_file():
        log(f"warning: base {base!r} comes from a quantised GGUF file; merging into its dequantised fp32 weights "
            "(the merged model is that, plus the adapter: not the original full-precision model)")
    log(f"loading {base} (fp32) …")
    model = _load_quantised(folder) if quantised else load_model(base, dtype=torch.float32, device="cpu")
    tokenizer = load_tokenizer(base)
    names = []
    for i, adapter in enumerate(adapters):
        name = f"adapter{i}"
        adapter_config = load_adapter(model, adapter, name=name, activate=False)
        recorded = adapter_config.base_model_name_or_path
        if recorded and recorded not in (base, str(folder)) and Path(recorded).name != Path(base).name:
            log(f"note: {adapter} records base model {recorded!r}; merging into {base!r} (its shapes fit)")
        names.append(name)
    set_active(model, names)
    log(f"merging {len(names)} adapter(s) in fp32, saving as {str(target).removeprefix('torch.')} …")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merging into a 4-bit base")  # said once, below
        model = merge_and_unload(model, names)
    if quantised:
        log(f"warning: base {base!r} is stored in 4 bits (NF4); every layer is dequantised, so the merged "
            "model carries the NF4 rounding of the original weights")
        model = _dequantised(model)
    model = model.to(target)
    model.config.dtype = target
    _save(model, tokenizer, out, max_shard_size, info={
        "base_model": base, "adapters": [str(Path(a).resolve()) for a in adapters],
        "dtype": str(target).removeprefix("torch."),
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
    })
    return out


def _check_shard_size(size: str | int) -> None:
    if isinstance(size, int) and size > 0:
        return
    if not isinstance(size, str) or not re.fullmatch(r"\s*\d+(\.\d+)?\s*(TB|GB|MB|KB|TiB|GiB|MiB|KiB|B)?\s*", size,
                                                   re.IGNORECASE):
        raise LorakitError(f"--max-shard-size {size!r}: expected a size such as 5GB, 500MB or a number of bytes")


def _save(model: Any, tokenizer: Any, out: Path, max_shard_size: str | int, info: dict) -> None:
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(tmp)
        (tmp / INFO_NAME).write_text(json.dumps({**info, "lorakit_version": __version__}, indent=2) + "\n")


def _base_dtype(config: Any) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32


def _check_quantisation(base: str, config: Any) -> bool:
    """True for a bitsandbytes 4-bit base; other quantised bases are refused."""
    quant = getattr(config, "quantization_config", None)
    if not quant:
        return False
    get = quant.get if isinstance(quant, dict) else (lambda key, default=None: getattr(quant, key, default))
    if get("quant_method") == "bitsandbytes" and get("load_in_4bit", False):
        return True
    raise LorakitError(f"base model {base!r} is stored quantised ({get('quant_method') or 'unknown method'}"
                       f"{', 8-bit' if get('load_in_8bit', False) else ''}); lorakit merges into full-precision "
                       "bases and bitsandbytes 4-bit ones — merge into the full-precision base model instead")


def _load_quantised(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu").eval()
    except Exception as e:
        raise LorakitError(f"cannot load the 4-bit base in {folder} (needs bitsandbytes): {type(e).__name__}: {e}") from e


def _dequantised(model: Any) -> Any:
    """The same weights in a plain (unquantised) model of the same architecture, fp32."""
    from transformers import AutoModelForCausalLM

    for name, module in list(model.named_modules()):
        if is_quantized(module):
            set_submodule(model, name, dense_copy(module, torch.float32))
    state = {k: v.float() for k, v in model.state_dict().items()}
    config = model.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    return plain.eval()
