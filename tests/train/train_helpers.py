"""Helpers for the training tests: a tiny Llama saved with the real SmolLM2 tokenizer, a data file, configs.

Not a conftest.py (``from conftest import make_tiny`` must keep finding tests/conftest.py).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

QUICKSTART = Path(__file__).resolve().parents[2] / "src" / "lorakit" / "train" / "quickstart.jsonl"


@functools.cache
def tiny_model_dir(root: str) -> str:
    """A 2-layer Llama (hidden 32) with SmolLM2's vocabulary and tokenizer, saved under ``root``."""
    import torch
    import transformers as tf

    from lorakit.models import load_tokenizer

    folder = Path(root) / "tiny-llama"
    if (folder / "config.json").is_file():
        return str(folder)
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            initializer_range=0.3, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_data(folder: Path, rows: int = 48, offset: int = 0, name: str = "train.jsonl") -> str:
    """The first ``rows`` quickstart examples (after ``offset``) as a JSONL file."""
    lines = QUICKSTART.read_text().splitlines()[offset:offset + rows]
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def tiny_config(tmp: Path, model_dir: str, **train) -> dict:
    """A config mapping for a fast run on the tiny model."""
    data = {"train": write_data(tmp), "eval": write_data(tmp, 16, offset=100, name="eval.jsonl"),
            "max_length": 96, "cache": False}
    settings = {"batch_size": 2, "lr": 5e-3, "warmup_steps": 2, "max_steps": 6, "save_every": 2,
                "keep_checkpoints": 10, "plots": False, "device": "cpu",
                # fp32 whatever the CPU: auto picks bf16 where the CPU multiplies it natively, and these tests
                # compare numbers at 1e-5 (the bf16 default has tests of its own).
                "dtype": "fp32"}
    settings.update(train)
    return {"model": model_dir, "data": data, "adapter": {"r": 4, "alpha": 8, "dropout": 0.1},
            "train": settings, "output": str(tmp / "run")}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
