"""Load a base model spec ``M`` with transformers: its config, its weights, its tokenizer.

Every function takes any spec :func:`lorakit.models.resolution.resolve` takes and finds the
folder through it (so a GGUF file is converted once, on first use, and nothing is downloaded).

Notable:

- :func:`load_model_config` reads a GGUF file's metadata when it is not converted yet, and a hub
  id's ``config.json`` alone: planning a run (``lorakit estimate``) needs no weights.
- Weights load from safetensors only (``use_safetensors=True``), in eval mode, in the dtype asked
  for or :func:`default_dtype` of the device.
- torch / transformers are imported inside the functions so ``lorakit --help`` stays instant.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorakit import gguf_conversion
from lorakit.errors import LorakitError
from lorakit.models.resolution import _locate, resolve  # _locate: what a spec is, before any conversion

if TYPE_CHECKING:
    import torch


def load_model_config(spec: str) -> Any:
    """The transformers ``PretrainedConfig`` of ``spec``, without converting or loading weights.

    A GGUF source that is not converted yet is read for its metadata only; a hub id needs
    only ``config.json`` in the local Hugging Face cache.

    Args:
        spec: any base model spec accepted by :func:`resolve`.

    Returns:
        The config (``quantization_config`` of a GGUF file removed: lorakit dequantises).

    Raises:
        LorakitError: when the spec cannot be found or its config cannot be read.
    """
    from transformers import AutoConfig

    source = _locate(spec)
    try:
        if source.dest is not None and gguf_conversion.is_complete(source.dest):
            return AutoConfig.from_pretrained(source.dest)
        if source.dest is not None:
            config = AutoConfig.from_pretrained(source.path.parent, gguf_file=source.path.name)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            return config
        return AutoConfig.from_pretrained(source.path)
    except Exception as e:  # transformers raises OSError/ValueError/KeyError for bad configs
        raise LorakitError(f"cannot read the config of model {spec!r} from {source.path}: "
                           f"{type(e).__name__}: {e}") from e


load_config = load_model_config
"""The first name of :func:`load_model_config` (docs/models.md until #17), kept for existing code."""


def load_model(spec: str, dtype: torch.dtype | str | None = None,
               device: str | torch.device | None = None) -> Any:
    """Load ``spec`` as a transformers ``AutoModelForCausalLM`` in eval mode.

    Args:
        spec: any base model spec accepted by :func:`resolve`.
        dtype: a ``torch.dtype`` or a name (``"bf16"``, ``"fp16"``, ``"fp32"``, ``"bfloat16"``,
            ``"float32"``, …); None = :func:`default_dtype` of the device.
        device: where the weights go; None = ``"cuda"`` when available, else ``"cpu"``.

    Returns:
        The model, in eval mode, on ``device``, in ``dtype``.

    Raises:
        LorakitError: when the spec cannot be resolved, the dtype is unknown, or loading fails.
    """
    import torch
    from transformers import AutoModelForCausalLM

    folder = resolve(spec)
    device = torch.device(device if device is not None else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = default_dtype(device) if dtype is None else _parse_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        model = model.to(device)
    except Exception as e:
        raise LorakitError(f"cannot load model {spec!r} from {folder} as a causal LM "
                           f"({dtype}, {device}): {type(e).__name__}: {e}") from e
    return model.eval()


def load_tokenizer(spec: str) -> Any:
    """Load the tokenizer of ``spec`` (``AutoTokenizer``), chat template included when present.

    Args:
        spec: any base model spec accepted by :func:`resolve`.

    Returns:
        The tokenizer.

    Raises:
        LorakitError: when the spec cannot be resolved or its folder holds no usable tokenizer.
    """
    from transformers import AutoTokenizer

    folder = resolve(spec)
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise LorakitError(f"cannot load a tokenizer for model {spec!r} from {folder} "
                           f"({type(e).__name__}: {e}); the folder needs tokenizer.json or "
                           "tokenizer_config.json with its vocabulary files") from e


def default_dtype(device: str | torch.device | None) -> torch.dtype:
    """The compute dtype lorakit picks for ``device``: bf16 on a CUDA GPU that supports it, else fp32.

    Args:
        device: a device or its name; None means the CPU.

    Returns:
        ``torch.bfloat16`` or ``torch.float32``.
    """
    import torch

    kind = torch.device(device).type if device is not None else "cpu"
    if kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_DTYPES = {"fp32": "float32", "float32": "float32", "float": "float32",
           "bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "half": "float16"}


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if name is None:
        raise LorakitError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32")
    return getattr(torch, name)
