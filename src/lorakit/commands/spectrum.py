"""``lorakit spectrum M [--top PCT] [--out FILE]``: rank a model's weight matrices by SNR.

Streams the safetensors weights one matrix at a time (progress on stderr), caches the result per
model, prints a ranked table per module type with the selected rows marked ``*``, and a YAML
fragment for a training config (written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="M", help="base model: alias, local folder, .gguf file or cached hub id")
    parser.add_argument("--top", type=float, default=25.0, metavar="PCT",
                        help="percentage of matrices to select per module type (default 25, as in the paper)")
    parser.add_argument("--out", metavar="FILE", help="write the YAML selection to FILE")
    parser.add_argument("--json", action="store_true", help="print the full scan and selection as JSON")
    parser.add_argument("--no-cache", action="store_true", help="rescan even when a cached result exists")


def run(args: argparse.Namespace) -> int:
    from lorakit._fs import atomic_write_text
    from lorakit.errors import LorakitError
    from lorakit.models import resolve
    from lorakit.spectrum import excluded_experts, format_table, scan, selected_modules, yaml_snippet

    if not 0.0 <= args.top <= 100.0:
        raise LorakitError(f"--top {args.top:g}: expected a percentage between 0 and 100 (paper default 25)")
    folder = resolve(args.model)
    start = time.perf_counter()
    progress, finish = _progress_display()
    try:
        results = scan(folder, progress=progress, use_cache=not args.no_cache)
    finally:
        finish()
    elapsed = time.perf_counter() - start
    snippet = yaml_snippet(results, args.top, args.model)
    if args.out:
        out = Path(args.out)
        from lorakit._fs import atomic_write_text

        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, snippet)
        except OSError as err:
            raise LorakitError(f"--out {out}: cannot write ({err.strerror}); choose a writable path") from err
    if args.json:
        print(json.dumps({"model": args.model, "folder": str(folder), "top": args.top,
                          "selected": selected_modules(results, args.top),
                          "excluded_expert_tensors": excluded_experts(folder),
                          "matrices": [asdict(r) for r in results]}, indent=2))
        return 0
    chosen = len(selected_modules(results, args.top))
    print(f"Spectrum SNR of {args.model}: {len(results)} matrices in "
          f"{len({r.module_type for r in results})} module types, {elapsed:.1f} s; "
          f"top {args.top:g}% per type = {chosen} selected (*)\n")
    experts = excluded_experts(folder)
    if experts:
        print(f"Not ranked: {experts} routed-expert weight tensors (a mixture-of-experts model trains an MoE layer's "
              "experts as one 3-D tensor each; adapt them with LoRA on adapter.target_parameters, e.g. "
              "[mlp.experts.gate_up_proj, mlp.experts.down_proj])\n")
    print(format_table(results, args.top))
    print(snippet, end="")
    if args.out:
        print(f"\nwrote {args.out}")
    return 0


def _progress_display() -> tuple[Callable[[int, int, str], None], Callable[[], None]]:
    """A progress callback for :func:`lorakit.spectrum.scan`: a tqdm bar on a terminal, else
    a plain line every 10 %. Returns (callback, finish)."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar: list = []

        def tick(done: int, total: int, name: str) -> None:
            if not bar:
                bar.append(tqdm(total=total, unit="matrix", desc="spectrum", file=sys.stderr))
            bar[0].set_postfix_str(name.removesuffix(".weight")[-40:], refresh=False)
            bar[0].update(done - bar[0].n)

        return tick, lambda: bar[0].close() if bar else None

    last = [-1]

    def line(done: int, total: int, name: str) -> None:
        tenth = done * 10 // total
        if tenth != last[0]:
            last[0] = tenth
            print(f"spectrum: {done}/{total} matrices ({100 * done // total}%) {name}", file=sys.stderr, flush=True)

    return line, lambda: None
