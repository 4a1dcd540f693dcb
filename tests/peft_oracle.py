"""PEFT from PyPI as the test oracle: build, save and load its adapters, failing on key warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# Messages PEFT emits when a file's keys do not fit the model: treated as failures (REFERENCE.md trap).
_KEY_WARNINGS = ("missing adapter keys", "unexpected keys", "unexpected keyword", "missing keys")


def peft_load(base: torch.nn.Module, folder: str | Path, **kwargs):
    """``PeftModel.from_pretrained`` that raises on any missing/unexpected-key warning."""
    import peft

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, str(folder), **kwargs)
    bad = [str(w.message) for w in caught if any(s in str(w.message).lower() for s in _KEY_WARNINGS)]
    assert not bad, f"PEFT warned while loading {folder}: {bad}"
    return model.eval()


def peft_config(**kwargs):
    import peft

    return peft.LoraConfig(**kwargs)


def logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits
