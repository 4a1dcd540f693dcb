"""lorakit's GGUF adapter export against llama.cpp's own ``convert_lora_to_gguf.py`` (the reference).

Two random rank-8 adapters on the last layer of the built-in SmolLM2 (``q_proj``, ``k_proj``,
``down_proj``; B ~ N(0, 0.2)) are written as PEFT folders and converted twice, by llama.cpp's
converter and by ``lorakit export``, both as f32:

1. plain LoRA (alpha 16): the two files must hold the same tensors bit for bit — same names,
   shapes, metadata, and the same Q/K row permutation of B;
2. rsLoRA with ``rank_pattern`` {q_proj: 4} and ``alpha_pattern`` {k_proj: 64}: for every module it
   prints the norm of the ΔW that llama.cpp computes from each file (``alpha/r · B A``, r read off
   lora_b) divided by the trained ΔW (PEFT's ``s · B A``). lorakit's file gives 1; the converter's
   gives ``(alpha/r) / s`` — it ignores rsLoRA and the alpha pattern.

The converter comes with llama.cpp: a checkout, or the copy vendored in the llama-cpp-python sdist::

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python benchmarks/gguf_converter.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp

It runs the converter with this Python (it needs transformers, torch and the ``gguf`` package, all in
lorakit's test environment). Nothing is timed; a few seconds of work.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

MODULES = ["q_proj", "k_proj", "down_proj"]


def random_adapter(model: torch.nn.Module, folder: Path, config) -> Path:
    """``config`` with random A and B ~ N(0, 0.2) on ``model``, saved to ``folder``; the model is left as it was."""
    from lorakit import add_adapter, delete_adapter, save_adapter
    from lorakit.inject import named_adapter_layers

    torch.manual_seed(0)
    add_adapter(model, dataclasses.replace(config, init_lora_weights=False), "default")
    with torch.no_grad():
        for _, layer in named_adapter_layers(model):
            for B in layer.lora_B.values():
                B.weight.normal_(0, 0.2)
    save_adapter(model, folder, names=["default"], base_model_name_or_path="smollm2-135m-instruct")
    delete_adapter(model, "default")
    return folder


def tensors(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """A GGUF adapter's tensors by name, and its ``adapter.lora.alpha``."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {t.name: np.array(t.data) for t in reader.tensors}, float(reader.fields["adapter.lora.alpha"].contents())


def llama_cpp_delta(file: tuple[dict[str, np.ndarray], float], weight: str) -> np.ndarray:
    """ΔW of ``weight`` as llama.cpp computes it from a file: ``alpha / r · B A``, r = lora_b's columns."""
    t, alpha = file
    B, A = t[weight + ".lora_b"].astype(np.float64), t[weight + ".lora_a"].astype(np.float64)
    return alpha / B.shape[1] * (B @ A)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp folder with convert_lora_to_gguf.py")
    args = parser.parse_args()
    converter = args.llama_cpp / "convert_lora_to_gguf.py"
    if not converter.is_file():
        parser.error(f"{converter} does not exist")

    from lorakit import LoraConfig
    from lorakit.adapters.peft_format import read_factors
    from lorakit.export.base import load_base
    from lorakit.export.llama_cpp import export_gguf
    from lorakit.models import load_model, resolve

    base_dir = resolve("smollm2-135m-instruct")
    base = load_base("smollm2-135m-instruct")
    model = load_model(str(base_dir), dtype=torch.float32, device="cpu")
    last = model.config.num_hidden_layers - 1
    configs = {
        "plain": LoraConfig(r=8, lora_alpha=16, target_modules=MODULES, layers_to_transform=[last]),
        "rslora+patterns": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=MODULES,
                                      layers_to_transform=[last], rank_pattern={"q_proj": 4},
                                      alpha_pattern={"k_proj": 64}),
    }
    same_everywhere = True
    with tempfile.TemporaryDirectory() as tmp:
        for label, config in configs.items():
            folder = random_adapter(model, Path(tmp) / label.replace("+", "-"), config)
            theirs = folder.with_suffix(".converter.gguf")
            subprocess.run([sys.executable, str(converter), str(folder), "--base", str(base_dir), "--outfile",
                            str(theirs), "--outtype", "f32"], check=True, capture_output=True)
            ours = export_gguf(folder, base, folder.with_suffix(".lorakit.gguf"), dtype="f32").path
            t_theirs, t_ours = tensors(theirs), tensors(ours)
            identical = (t_theirs[1] == t_ours[1] and t_theirs[0].keys() == t_ours[0].keys()
                         and all(np.array_equal(t_theirs[0][k], t_ours[0][k]) for k in t_theirs[0]))
            print(f"{label}: {len(t_theirs[0])} tensors; converter's file == lorakit's file (names, shapes, "
                  f"values, alpha): {identical}")
            _, factors = read_factors(folder)
            for module, f in factors.items():
                weight = base.layout.gguf_name(module)
                trained = np.linalg.norm(f.delta().numpy())
                ratios = [np.linalg.norm(llama_cpp_delta(file, weight)) / trained for file in (t_theirs, t_ours)]
                print(f"  {weight}: r {f.rank}, PEFT scale {f.scale:.4f}; llama.cpp's |ΔW| / trained |ΔW|: "
                      f"converter's file {ratios[0]:.4f}, lorakit's file {ratios[1]:.4f}")
                same_everywhere &= abs(ratios[1] - 1) < 1e-5
            same_everywhere &= identical or label != "plain"
    print(f"lorakit's files give the trained ΔW in llama.cpp everywhere, and equal the converter's for plain LoRA: "
          f"{same_everywhere}")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
