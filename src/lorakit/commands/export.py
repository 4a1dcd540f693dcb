"""``lorakit export DIR --to gguf|ollama --base M --out PATH [--merged] [--dtype f16|bf16|f32|q8_0]``.

``--to gguf`` writes a llama.cpp LoRA adapter (``--out FILE.gguf``), or with ``--merged`` the whole
merged model; ``--to ollama`` writes a folder (``--out DIR``) with that GGUF and a Modelfile, and
prints the ``ollama create`` command. See docs/export.md and :mod:`lorakit.export`.
"""

from __future__ import annotations

import argparse

DTYPES = ("f32", "f16", "bf16", "q8_0")  # = lorakit.export.gguf_file.DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", metavar="DIR", help="the adapter folder (PEFT format)")
    parser.add_argument("--to", required=True, choices=("gguf", "ollama"),
                        help="gguf: one .gguf file for llama.cpp; ollama: a folder with the GGUF and a Modelfile")
    parser.add_argument("--base", required=True, metavar="M",
                        help="the base model the adapter was trained on: a .gguf file or built-in alias (its layout "
                             "and metadata are read from it), or a transformers folder / hub id (adapter form only)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="the .gguf file (--to gguf) or folder (--to ollama)")
    parser.add_argument("--merged", action="store_true",
                        help="write the whole merged model instead of a LoRA adapter (needed for DoRA, embedding or "
                             "lm_head LoRA, modules_to_save, trained biases)")
    parser.add_argument("--dtype", choices=DTYPES,
                        help="encoding of the weights: default f32 for an adapter (exact), f16 merged; q8_0 writes "
                             "tensors whose rows are not a multiple of 32 long as f16")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    if args.to == "ollama":
        from lorakit.export.ollama import export_ollama

        result = export_ollama(args.adapter, args.base, args.out, merged=args.merged, dtype=args.dtype,
                               overwrite=args.force)
        print(f"Ollama model folder written to {result.folder}: {result.gguf.name}, {result.modelfile.name} "
              f"(stop: {', '.join(result.stops) or 'none'})")
        print(f"create the model with:\n  {result.command}")
        return 0
    from lorakit.export.llama_cpp import export_gguf
    from lorakit.export.merged import MergedExport

    result = export_gguf(args.adapter, args.base, args.out, merged=args.merged, dtype=args.dtype, overwrite=args.force)
    if isinstance(result, MergedExport):
        print(f"merged {result.arch} model written to {result.path} ({result.tensors} tensors)")
        if result.added:
            print(f"  added {', '.join(result.added)} (the adapter unties the output head)")
        print(f"run it with llama.cpp:\n  llama-cli -m {result.path}")
        return 0
    print(f"llama.cpp LoRA adapter written to {result.path}: {result.arch}, {result.tensors // 2} modules, "
          f"adapter.lora.alpha {result.alpha:g}")
    if result.folded:
        factors = sorted({round(f, 6) for f in result.folded.values()})
        shown = ", ×".join(f"{f:g}" for f in factors[:4]) + (", …" if len(factors) > 4 else "")
        print(f"  PEFT scale folded into {len(result.folded)} modules' factors (×{shown}): llama.cpp's alpha/r rule "
              "gives exactly the trained s·B·A")
    if result.f16_fallback:
        print(f"  {len(result.f16_fallback)} tensors written as f16: their rows are not a multiple of 32 (q8_0 blocks)")
    from lorakit.models import gguf_source

    base = gguf_source(args.base)
    model = base if base is not None else "BASE.gguf (the base model converted by llama.cpp)"
    print(f"run it with llama.cpp:\n  llama-cli -m {model} --lora {result.path}")
    return 0
