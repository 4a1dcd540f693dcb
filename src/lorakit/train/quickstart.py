"""``lorakit train`` without a config: a few minutes of LoRA on SmolLM2, measured before and after.

The task (``quickstart.jsonl``, built from WordNet by :mod:`lorakit.train.quickstart_data`): asked
to define a word, answer with one line of JSON ``{"word", "pos", "definition"}``. The base model
answers in prose; the adapter learns the format. Printed before and after training:

- eval loss: mean cross-entropy on the answer tokens of the 40 held-out rows;
- JSON answers: share of greedy answers to those prompts that parse as a JSON object with exactly
  the fields word, pos and definition, and the asked word;
- two sample generations.

Everything is on the machine: the base model is the built-in alias, the data is package data.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from lorakit.adapter_io import load_adapter
from lorakit.data.pipeline import load_data, pad_token_id
from lorakit.evaluate.core import answer_loss
from lorakit.models import load_model, load_tokenizer
from lorakit.train.config import load_config
from lorakit.train.loop import train
from lorakit.train.setup import resolve_device, resolve_dtype
from lorakit.train.summary import RunResult

HERE = Path(__file__).resolve().parent
TRAIN_FILE = HERE / "quickstart.jsonl"
EVAL_FILE = HERE / "quickstart_eval.jsonl"
FIELDS = {"word", "pos", "definition"}

QUICKSTART: dict[str, Any] = {
    "model": "smollm2-135m-instruct",
    "data": {"train": str(TRAIN_FILE), "eval": str(EVAL_FILE), "max_length": 128},
    "adapter": {"method": "lora", "r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"},
    "train": {"epochs": 1, "batch_size": 8, "lr": 2.0e-3, "warmup_steps": 5, "schedule": "cosine",
              "eval_every": 10, "save_every": 10, "log_every": 1},
    "output": "runs/quickstart",
}


def quickstart(overrides: list[str] | None = None, quiet: bool = False) -> RunResult:
    """Train the quickstart adapter, printing base vs adapter results; how the run ended.

    ``lorakit train`` without a config calls it and prints :meth:`RunResult.summary` after.
    """
    config = load_config(None, overrides, base=QUICKSTART)
    checkpoints = Path(config.output) / "checkpoints"
    if config.resume is None and checkpoints.exists():
        shutil.rmtree(checkpoints)  # the quickstart owns its run folder: start over each time
    began = time.perf_counter()
    print(f"lorakit quickstart: {config.model} learns to answer definitions as one line of JSON\n"
          f"  data: {len(TRAIN_FILE.read_text().splitlines())} training and "
          f"{len(EVAL_FILE.read_text().splitlines())} held-out examples from WordNet 3.0\n")
    device = resolve_device(config.train.device)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, dtype=resolve_dtype(config.train.dtype, device), device=device)
    eval_rows = load_data(config.data, tokenizer).eval
    prompts = [json.loads(line) for line in Path(config.data.eval).read_text().splitlines() if line.strip()]
    before = measure(model, tokenizer, eval_rows, prompts, config)
    print(f"before training (base model): eval loss {before['loss']:.3f}, JSON answers {before['json']:.0%}\n")

    result = train(config, quiet=quiet)
    if result.interrupted:
        return result
    load_adapter(model, result.adapter)
    after = measure(model, tokenizer, eval_rows, prompts, config)
    print()
    print(results_table(before, after, prompts))
    print(f"\nquickstart finished in {time.perf_counter() - began:.0f} s")
    return result


@torch.no_grad()
def measure(model: torch.nn.Module, tokenizer: Any, eval_rows: Any, examples: list[dict], config: Any) -> dict:
    """Eval loss on answer tokens, the share of well-formed JSON answers, and the generations."""
    model.eval()
    loss = answer_loss(model, eval_rows, pad_token_id(tokenizer), config.train.batch_size)["loss"]
    questions = [ex["messages"][:-1] for ex in examples]
    answers = generate(model, tokenizer, questions)
    words = [json.loads(ex["messages"][-1]["content"])["word"] for ex in examples]
    good = [is_good_answer(a, w) for a, w in zip(answers, words)]
    return {"loss": loss, "json": sum(good) / len(good), "answers": answers}


def is_good_answer(text: str, word: str) -> bool:
    """One JSON object with exactly the fields word, pos, definition, for the asked word."""
    try:
        value = json.loads(text.strip())
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and set(value) == FIELDS and str(value.get("word", "")).lower() == word.lower()


def generate(model: torch.nn.Module, tokenizer: Any, conversations: list[list[dict]], max_new_tokens: int = 48,
             batch_size: int = 20) -> list[str]:
    """Greedy answers to chat ``conversations`` (batched, left-padded)."""
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start:start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [a.strip() for a in out]


def results_table(before: dict, after: dict, examples: list[dict], samples: int = 2) -> str:
    """The before/after summary: metrics, then sample answers."""
    lines = ["                      base model   with adapter",
             f"eval loss (answers)   {before['loss']:10.3f}   {after['loss']:12.3f}",
             f"JSON answers          {before['json']:10.0%}   {after['json']:12.0%}"]
    for i in range(min(samples, len(examples))):
        question = examples[i]["messages"][-2]["content"]
        lines += ["", f"Q: {question}", f"  base:    {_one_line(before['answers'][i])}",
                  f"  adapter: {_one_line(after['answers'][i])}"]
    return "\n".join(lines)


def _one_line(text: str, width: int = 110) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"
