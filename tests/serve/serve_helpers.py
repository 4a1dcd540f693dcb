"""Helpers for the serving tests: a word-level tokenizer for tiny models, adapters on disk, references."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

import lorakit
from lorakit.adapter_io import load_adapter


class WordTokenizer:
    """Token i <-> the word ``w<i>``; enough for an engine over a tiny random model."""

    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [int(w[1:]) for w in text.split()]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f" w{i}" for i in ids)


def save_random_adapter(model: torch.nn.Module, folder: Path, r: int = 4, alpha: float = 8,
                        targets="all-linear", seed: int = 0, b_scale: float = 0.5, **config) -> Path:
    """A PEFT-format adapter with random, non-zero A and B (a trained-looking update) for ``model``."""
    work = copy.deepcopy(model)
    torch.manual_seed(seed)
    lorakit.add_adapter(work, lorakit.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                 init_lora_weights=False, **config))
    with torch.no_grad():  # nn.Linear's init gives B ~ U(±1/√r): scale to a visible but sane update
        for name, p in work.named_parameters():
            if "lora_B" in name:
                p.mul_(b_scale)
    lorakit.save_adapter(work, folder)
    return folder


def merged_copy(model: torch.nn.Module, folder: Path | None) -> torch.nn.Module:
    """``model`` with the adapter in ``folder`` merged into its weights (or untouched for None)."""
    work = copy.deepcopy(model)
    if folder is None:
        return work
    load_adapter(work, folder, "ref")
    return lorakit.merge_and_unload(work).eval()


def greedy_reference(model: torch.nn.Module, prompt: list[int], max_new: int, eos: set[int] = frozenset()) -> list[int]:
    """Greedy tokens of ``model`` for ``prompt`` alone, by transformers' own ``generate``."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new, do_sample=False, eos_token_id=sorted(eos) or None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def peft_dora_adapter(model: torch.nn.Module, folder: Path) -> Path:
    """A DoRA adapter written by PEFT itself (``use_dora=True``) for ``model``."""
    import peft

    work = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                                    use_dora=True))
    work.save_pretrained(folder)
    return folder
