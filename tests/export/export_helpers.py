"""Helpers for the export tests: adapters with known behaviour, a naive llama.cpp file, llama.cpp runs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import llama_cpp
except ImportError:  # the optional gguf-test extra; `make install` installs it
    llama_cpp = None

NO_LLAMA_CPP = ("llama-cpp-python is not installed, so the comparisons with real llama.cpp did NOT run: "
                "`make install` (or pip install -e '.[gguf-test]') builds it from source")
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason=NO_LLAMA_CPP)


def random_adapter(model: torch.nn.Module, folder: Path, config, std: float = 0.0, seed: int = 0,
                   base: str = "smollm2-135m-instruct") -> Path:
    """Save ``config`` with random A and B (B ~ N(0, std) if given) for ``model`` to ``folder``; the
    model is left as it was."""
    from lorakit import add_adapter, delete_adapter, save_adapter
    from lorakit.inject import named_adapter_layers

    torch.manual_seed(seed)
    add_adapter(model, dataclasses.replace(config, init_lora_weights=False), "default")
    try:
        with torch.no_grad():
            for _, layer in named_adapter_layers(model):
                for B in getattr(layer, "lora_B", {}).values():
                    if std:
                        B.weight.normal_(0, std)
                for m in getattr(layer, "lora_magnitude_vector", {}).values():
                    m.mul_(torch.empty_like(m).uniform_(0.8, 1.2))  # DoRA: a magnitude that is not the norm
        save_adapter(model, folder, names=["default"], base_model_name_or_path=base)
    finally:
        delete_adapter(model, "default")
    return folder


def rewrite_adapter(source: Path, dest: Path, edit) -> Path:
    """Copy an adapter folder, passing (config dict, tensors) through ``edit``."""
    from safetensors.torch import load_file, save_file

    dest.mkdir(parents=True)
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(source / "adapter_model.safetensors")
    config, tensors = edit(config, tensors)
    (dest / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_file({k: v.contiguous() for k, v in tensors.items()}, dest / "adapter_model.safetensors",
              metadata={"format": "pt"})
    return dest


def as_rslora(source: Path, dest: Path) -> Path:
    """The same adapter (same ΔW) as rsLoRA: with alpha' = alpha/√r, rsLoRA's s = alpha'/√r is alpha/r."""
    def edit(config, tensors):
        r = config["r"]
        return {**config, "use_rslora": True, "lora_alpha": config["lora_alpha"] / math.sqrt(r)}, tensors

    return rewrite_adapter(source, dest, edit)


def with_patterns(source: Path, dest: Path, ranks: dict[str, int], alphas: dict[str, float]) -> Path:
    """The same ΔW with ``rank_pattern``/``alpha_pattern``: factors zero-padded to the new rank, B
    rescaled so that alpha_m / r_m · B' A' stays alpha / r · B A."""
    import re

    def edit(config, tensors):
        r, alpha = config["r"], config["lora_alpha"]
        out = dict(tensors)
        for key in tensors:
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            rank = next((v for k, v in ranks.items() if re.match(rf"(.*\.)?({k})$", module)), r)
            a = next((v for k, v in alphas.items() if re.match(rf"(.*\.)?({k})$", module)), alpha)
            A, B = tensors[key], tensors[key.replace("lora_A", "lora_B")]
            A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1) * ((alpha / r) / (a / rank))
            out[key], out[key.replace("lora_A", "lora_B")] = A, B
        return {**config, "rank_pattern": ranks, "alpha_pattern": alphas}, out

    return rewrite_adapter(source, dest, edit)


def naive_gguf(adapter: Path, base, out: Path) -> Path:
    """What llama.cpp's own converter writes: alpha as saved, factors as trained, Q/K rows of B
    permuted — right for plain LoRA, wrong for rsLoRA and alpha patterns."""
    import gguf

    from lorakit.export.trained import read_adapter

    read = read_adapter(adapter)
    writer = gguf.GGUFWriter(out, base.layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(read.config.lora_alpha))
    for module in read.modules:
        A, B = read.factors(module)
        name = base.layout.gguf_name(module)
        order = base.layout.row_order(name)
        writer.add_tensor(name + ".lora_a", A.numpy())
        writer.add_tensor(name + ".lora_b", (B if order is None else B[order]).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# -- llama.cpp ---------------------------------------------------------------------------------------


def open_llama(model: Path, lora: Path | None = None, n_ctx: int = 256):
    """llama.cpp (llama-cpp-python) on ``model``, with the LoRA adapter ``lora``; CPU, deterministic.

    One thread: on a shared 2-core machine ggml's two busy-waiting threads decoded 15-30x slower.
    """
    return llama_cpp.Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=n_ctx,
                           n_threads=1, n_batch=n_ctx, logits_all=True, verbose=False, seed=0)


def llama_logits(llm, ids: list[int]) -> np.ndarray:
    """Logits at every position of ``ids`` (a fresh sequence), (len(ids), vocab) float64.

    llama-cpp-python writes ``scores`` only with ``logits_all=True`` and only rows below ``n_tokens``;
    every other row stays as allocated (zeros): reading one makes any change "vanish".
    """
    llm.reset()
    llm.eval(ids)
    assert llm.n_tokens == len(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    assert np.isfinite(logits).all() and (np.abs(logits).max(axis=1) > 0).all(), "llama.cpp wrote no logits"
    return logits


def llama_greedy(llm, ids: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """Greedy continuation of ``ids``: argmax of llama.cpp's logits, until a ``stop`` token."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if token in stop:
            break
        out.append(token)
        llm.eval([token])
    return out


def change_agreement(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """Cosine and norm ratio (theirs / ours) of two logit changes, flattened."""
    a, b = ours.ravel(), theirs.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))), float(np.linalg.norm(b) / np.linalg.norm(a))
