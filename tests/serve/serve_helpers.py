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


class ChatWordTokenizer(WordTokenizer):
    """The word tokenizer with a "chat template": the messages' contents, joined."""

    chat_template = "contents joined by spaces"

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return " ".join(m["content"] for m in messages)


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


LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_lora_and_dora(model: torch.nn.Module, root: Path, seed: int = 0) -> dict[str, Path]:
    """Two trained-looking adapters written by PEFT itself: ``lora`` on every linear layer, the output
    head and the input embeddings (r=4, rsLoRA off), ``dora`` on the attention and MLP projections
    (r=2, a magnitude that is not the initial norm, so DoRA is not plain LoRA). Random non-zero factors,
    scaled so that each adapter changes the model's distribution clearly but sanely."""
    import peft

    folders = {}
    configs = {"lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR + ["lm_head", "embed_tokens"],
                                       init_lora_weights=False),
               "dora": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                       use_dora=True, init_lora_weights=False)}
    for i, (name, config) in enumerate(configs.items()):
        torch.manual_seed(seed + i)
        work = peft.get_peft_model(copy.deepcopy(model), config, adapter_name=name)
        with torch.no_grad():
            for key, param in work.named_parameters():
                if "lora_embedding_B" in key:
                    param.mul_(0.02)  # N(0, 1) factors: keep the embedding update near the embeddings' size
                elif "lora_B" in key:
                    param.mul_(0.5)
                elif "lora_magnitude_vector" in key:
                    param.mul_(1 + 0.2 * torch.randn(param.shape))
        work.save_pretrained(root, selected_adapters=[name])
        folders[name] = root / name
    return folders


def peft_reference(model: torch.nn.Module, folders: dict[str, Path]):
    """One PEFT model holding every adapter in ``folders`` (the oracle): ``logits(ids, name)``."""
    import peft

    names = list(folders)
    work = peft.PeftModel.from_pretrained(copy.deepcopy(model), folders[names[0]], adapter_name=names[0])
    for name in names[1:]:
        work.load_adapter(folders[name], adapter_name=name)
    work.eval()

    def logits(ids: list[int], name: str | None) -> torch.Tensor:
        with torch.no_grad():
            if name is None:
                with work.disable_adapter():
                    return work(input_ids=torch.tensor([ids])).logits[0].float()
            work.set_adapter(name)
            return work(input_ids=torch.tensor([ids])).logits[0].float()

    return logits
