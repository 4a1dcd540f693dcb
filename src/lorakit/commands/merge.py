"""``lorakit merge --base M --adapter DIR [--adapter DIR …] --out DIR [--dtype bf16|fp16|fp32]``.

A standalone transformers model folder: the base weights with the adapters' updates folded in,
written as safetensors shards with the config, generation config, tokenizer and chat template,
so that ``AutoModelForCausalLM.from_pretrained(DIR)`` (and vLLM, llama.cpp's converter, …) load it
with no trace of LoRA.

Notable:

- The sum is taken in fp32 (the base is loaded in fp32), then cast once to ``--dtype`` (default:
  the base's own dtype): no double rounding.
- Tied embeddings (SmolLM2, Gemma, GPT-2): when an adapter changes the input embedding or the
  output head, the two are untied before merging and the saved config says
  ``tie_word_embeddings: false``, so a reload does not tie them back (and drop the update).
- Several ``--adapter`` flags merge their sum (as if all were active). To weight them, build one
  adapter first with ``lorakit combine``.
- The folder is written under a temporary name beside ``--out`` and renamed when complete.
- The library function is :func:`lorakit.merge_to_folder` (:mod:`lorakit.merged_folder`).
- A base given as a ``.gguf`` file (or the built-in alias) is quantised: lorakit dequantises it
  to fp32 once, and the merge is onto those dequantised weights; a warning says so.
- A base saved in 4 bits with bitsandbytes (``quantization_config`` with ``load_in_4bit``) is
  dequantised: adapted layers are merged into their dequantised weights, every other 4-bit layer
  is dequantised too, and the result is a plain fp32-computed model (a warning says that it
  carries the NF4 rounding of the original weights). Other quantisation methods are refused.
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
