"""The page tests' world: a tiny Llama with SmolLM2's tokenizer saved as a base folder, two adapters,
a 10-row data file whose references make exact match non-trivial, and ``lorakit eval``'s own report
on that file (the oracle the page's compare view must equal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from serve.serve_helpers import save_random_adapter

from lorakit.cli import build_parser, main

WORDS = ["cat", "river", "glass", "sing", "quiet", "ladder", "orbit", "bread", "winter", "honest"]
BUDGET = 8  # --max-new-tokens for eval and the page alike: answers do not depend on the references
ADAPTERS = ("alpha", "beta")
KEY = "sk-page-test"
BASE = "tiny"  # the base model's served name
MODELS = [BASE, *ADAPTERS]


def build_world(root: Path, tokenizer_folder: Path) -> dict[str, Any]:
    """Write the base, the adapters and the data under ``root``; run ``lorakit eval`` on the data."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_folder))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    base = root / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapters = {name: save_random_adapter(model, root / "adapters" / name, r=4, seed=seed)
                for seed, name in enumerate(ADAPTERS, 1)}
    data = root / "data"
    data.mkdir()
    references = [json.dumps({"word": w, "pos": "noun"}) for w in WORDS]
    draft = write_rows(data / "draft.jsonl", references)
    answers = run_eval(base, adapters, draft, root / "draft-report")["answers"]
    # Exact match that is neither 0 nor 1: rows 0-1 answered as the base answers, 2-3 as alpha, 4 as
    # beta; rows 5-9 keep JSON references (so JSON validity is reported, as eval does for JSON data).
    for row, model_name in ((0, "base"), (1, "base"), (2, "alpha"), (3, "alpha"), (4, "beta")):
        assert answers[model_name][row], f"{model_name} gave an empty answer to row {row}"
        references[row] = answers[model_name][row]
    ten = write_rows(data / "ten.jsonl", references)
    oracle = run_eval(base, adapters, ten, root / "eval-report")
    return {"root": root, "base": base, "adapters": adapters, "data": data, "ten": ten, "oracle": oracle}


def write_rows(path: Path, references: list[str]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f'Define the word "{w}".'},
                          {"role": "assistant", "content": ref}]} for w, ref in zip(WORDS, references)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_eval(base: Path, adapters: dict[str, Path], data: Path, out: Path) -> dict[str, Any]:
    """``lorakit eval`` itself on ``data``: its report.json, per-example answers and the folder."""
    argv = ["eval", "--base", str(base), "--data", str(data), "--out", str(out), "--max-new-tokens", str(BUDGET),
            "--no-forgetting", "--quiet"]
    for name, folder in adapters.items():
        argv += ["--adapter", f"{name}={folder}"]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    examples = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    answers = {m["name"]: [ex["outputs"][m["name"]] for ex in examples] for m in report["models"]}
    return {"report": report, "examples": examples, "answers": answers, "out": out}


def serve_args(world: dict[str, Any], *extra: str):
    """``lorakit serve``'s parsed arguments for the world: base, both adapters, the key, both roots."""
    argv = ["serve", "--base", str(world["base"]), "--served-model-name", BASE, "--api-key", KEY,
            "--data-root", str(world["data"]), "--adapter-root", str(world["root"] / "adapters"), "--max-batch", "8"]
    for name, folder in world["adapters"].items():
        argv += ["--adapter", f"{name}={folder}"]
    return build_parser().parse_args(argv + list(extra))
