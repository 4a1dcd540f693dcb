"""``lorakit merge --base M --adapter DIR [--adapter DIR …] --out DIR [--dtype bf16|fp16|fp32]``.

A standalone transformers model folder: the base weights with the adapters' updates folded in, so
that ``AutoModelForCausalLM.from_pretrained(DIR)`` (and vLLM, llama.cpp's converter, …) load it with
no trace of LoRA. Several ``--adapter`` flags merge their sum. The work is
:func:`lorakit.merge_to_folder` (:mod:`lorakit.merged_folder`, whose docstring says what is notable:
fp32 sum, tied embeddings, GGUF and 4-bit bases); this module parses the flags and prints.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="M", help="base model: hub id, folder, .gguf file or alias")
    parser.add_argument("--adapter", required=True, action="append", metavar="DIR",
                        help="adapter folder (PEFT format); repeat to merge the sum of several")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the merged model")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the saved weights (default: the base model's)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors shard (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from lorakit.merged_folder import merge_to_folder

    out = merge_to_folder(args.base, args.adapter, args.out, dtype=args.dtype,
                          max_shard_size=args.max_shard_size, overwrite=args.force, log=_stderr)
    files = sorted(p.name for p in out.iterdir())
    print(f"merged model written to {out}: {', '.join(files)}")
    print("load it with transformers: AutoModelForCausalLM.from_pretrained(" + repr(str(out)) + ")")
    return 0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
