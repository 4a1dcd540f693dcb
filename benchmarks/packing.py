"""Packing benchmark: padding share and LoRA training throughput, packed vs padded batches.

What it measures, on WordNet instruction data (``wordnet_data.py``) tokenised by lorakit's own
pipeline with the SmolLM2 chat template:

1. Padding share of each batch plan over the whole data set (``lorakit.data.padding_share``):
   padded with length grouping (lorakit's default on the CPU), padded in random order (what a
   plain data loader does), and packed (``batch_size`` rows of up to ``max_length`` tokens, each
   holding whole examples; a batch pads its rows to the fullest one).
2. Training throughput in non-pad tokens per second: forward + backward + AdamW step of a LoRA
   adapter (r=16, alpha=32, all linear layers) on the real SmolLM2-135M-Instruct, fp32 on CPU.
   A padded batch holds ``batch_size`` rows; a packed batch ``batch_size`` packed rows, so it
   holds more examples per step (SDPA computes attention over every pair of a packed row's
   tokens: its cost per token grows with ``max_length``).

Protocol (REFERENCE.md, "Measuring speed"): one process, one model, the variants interleaved
round-robin (which goes first alternates per round), one untimed warm-up step each (the plan's
largest batch), then per-round ratios packed/padded and their median. One thread by default:
on these shared 2-core machines it gives far steadier ratios than two (``--threads 2`` is faster
in absolute terms).

Usage::

    python benchmarks/packing.py [--rows 2000] [--steps 12] [--model smollm2-135m-instruct] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wordnet_data  # noqa: E402  (benchmarks/ is not a package)

PLANS = {  # name -> plan_batches keyword arguments
    "packed": {"packing": True},
    "padded": {"packing": False, "group_by_length": True},
    "padded-random": {"packing": False, "group_by_length": False},
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="WordNet rows to build and tokenise (default 2000)")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds; one step of each plan per round (default 12)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model spec (default smollm2-135m-instruct)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per padded batch (default 8)")
    parser.add_argument("--max-length", type=int, default=128,
                        help="longest row in tokens, and the length of a packed row (default 128)")
    parser.add_argument("--plans", default=",".join(PLANS),
                        help=f"plans to time, comma-separated; 'padded' is the reference (default {','.join(PLANS)})")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: steadiest ratios)")
    parser.add_argument("--seed", type=int, default=0, help="data sampling and batch order seed (default 0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    args.plans = [p.strip() for p in args.plans.split(",") if p.strip()]
    unknown = [p for p in args.plans if p not in PLANS]
    if unknown or "padded" not in args.plans or args.steps < 1:
        parser.error(f"--plans: choose from {', '.join(PLANS)}, including 'padded'; --steps >= 1")
    return args


def build_data(rows: int, seed: int) -> Path:
    """The WordNet JSONL file for ``rows`` and ``seed``, built once into the lorakit cache."""
    from lorakit.models import cache_dir

    path = cache_dir() / "datasets" / f"wordnet-define-{rows}-seed{seed}.jsonl"
    if not path.is_file():
        tmp = wordnet_data.write_jsonl(wordnet_data.build_rows(rows, seed), path.with_suffix(".partial"))
        tmp.rename(path)
    return path


def plan_all(lengths, args: argparse.Namespace) -> tuple[dict[str, list], dict[str, dict]]:
    """Every plan of PLANS over the whole data set, and its padding statistics."""
    from lorakit.data import padding_share, plan_batches

    plans, stats = {}, {}
    for name, kwargs in PLANS.items():
        plan = plan_batches(lengths, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, **kwargs)
        plans[name] = plan
        stats[name] = {"batches": len(plan), "padding_share": padding_share(plan, lengths)}
    return plans, stats


def train_step(model, optimizer, batch: dict) -> None:
    """Forward + backward + AdamW step. ``use_cache=False`` lets transformers see packed rows."""
    loss = model(**{k: v for k, v in batch.items() if k != "real_tokens"}, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def non_pad_tokens(batch: dict) -> int:
    """Real tokens in a batch: the attention mask's ones when padded; when packed, the positions that are
    not a row's padding tail (the tail is where the labels end: -100 from the last example's end)."""
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(batch["real_tokens"])


def measure(model, optimizer, batches: dict[str, list[dict]], rounds: int) -> dict[str, list[tuple[int, int, float]]]:
    """Round-robin timing: ``(non-pad tokens, all tokens, seconds)`` per plan per round, after one
    warm-up step each on the plan's first (largest) batch; a plan with too few batches repeats them."""
    for name in batches:
        train_step(model, optimizer, batches[name][0])
    names = list(batches)
    timings: dict[str, list[tuple[int, int, float]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:  # alternate who goes first
            batch = batches[name][(1 + r) % len(batches[name])]
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            seconds = time.perf_counter() - start
            timings[name].append((non_pad_tokens(batch), batch["input_ids"].numel(), seconds))
            rows, width = batch["input_ids"].shape
            print(f"  round {r + 1:>2}/{rounds} {name:<13} {rows:>2} x {width:<5} "
                  f"{timings[name][-1][0] / seconds:7.1f} tok/s", flush=True)
    return timings


def summarise(timings: dict[str, list[tuple[int, int, float]]]) -> dict:
    """Per plan: median tokens/s, the median of its per-round ratios to ``padded``, and the padding
    in the timed batches."""
    rate = {name: [n / s for n, _, s in rows] for name, rows in timings.items()}
    out = {}
    for name, rows in timings.items():
        ratios = [p / q for p, q in zip(rate[name], rate["padded"])]
        real, shaped, seconds = (sum(column) for column in zip(*rows))
        out[name] = {"tokens_per_s_median": statistics.median(rate[name]),
                     "tokens_per_s_total": real / seconds,
                     "seconds_per_step_median": statistics.median(s for _, _, s in rows),
                     "non_pad_tokens_per_step_mean": real / len(rows),
                     "timed_batches_padding_share": 1 - real / shaped if shaped else 0.0,
                     "ratio_to_padded_median": statistics.median(ratios),
                     "ratio_to_padded_per_round": ratios}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from lorakit.errors import LorakitError

    try:
        return run(args)
    except (LorakitError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    """The whole benchmark; returns the exit code."""
    import torch
    import transformers

    import lorakit
    from lorakit.data import DataConfig, pad_token_id, tokenize_file
    from lorakit.models import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    path = build_data(args.rows, args.seed)
    tokenizer = load_tokenizer(args.model)
    config = DataConfig(train=str(path), format="messages", max_length=args.max_length, seed=args.seed)
    dataset, report = tokenize_file(str(path), tokenizer, config)
    print("\n".join(report.summary()))
    lengths = dataset.lengths
    print(f"row lengths (tokens): min {lengths.min()}, median {int(sorted(lengths)[len(lengths) // 2])}, "
          f"mean {lengths.mean():.1f}, max {lengths.max()}; {int(lengths.sum()):,} tokens")
    plans, shares = plan_all(lengths, args)

    pad = pad_token_id(tokenizer)
    needed = args.steps + 1  # warm-up + timed
    batches = {name: [_collated(dataset, idx, PLANS[name]["packing"], pad) for idx in plans[name][:needed]]
               for name in args.plans}
    model = load_model(args.model, dtype="fp32", device="cpu")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    print(f"setup {time.perf_counter() - t0:.0f} s; {sum(p.numel() for p in trainable):,} trainable parameters; "
          f"{args.threads} thread(s); {args.steps} rounds")
    timings = measure(model, optimizer, batches, args.steps)
    result = summarise(timings)
    report_table(shares, result, args)
    if args.json:
        payload = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "rows_kept": len(dataset), "tokens": int(lengths.sum()),
                              "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
                              "dtype": "float32", "optimizer": "AdamW lr=1e-4"},
                   "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                                   "python": platform.python_version(), "machine": platform.machine()},
                   "padding": shares, "throughput": result, "wall_s": time.perf_counter() - t0}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _collated(dataset, batch, packing: bool, pad: int) -> dict:
    from lorakit.data import collate
    from lorakit.data.batching import rows_of

    out = collate(dataset, batch, packing=packing, pad_token_id=pad)
    out["real_tokens"] = int(dataset.lengths[rows_of(batch)].sum())  # popped before the model sees the batch
    return out


def report_table(shares: dict, result: dict, args: argparse.Namespace) -> None:
    """The table: plan, padding share, median non-pad tokens/s, median per-round ratio to ``padded``."""
    print(f"\n{'plan':<14} {'batches':>7}  {'padding %':>9}  {'non-pad tok/s (median)':>22}  {'ratio to padded':>15}")
    for name in PLANS:
        timed = result.get(name)
        speed = f"{timed['tokens_per_s_median']:.1f}" if timed else "(not timed)"
        ratio = f"{timed['ratio_to_padded_median']:.3f}" if timed else ""
        print(f"{name:<14} {shares[name]['batches']:>7}  {100 * shares[name]['padding_share']:>9.2f}  "
              f"{speed:>22}  {ratio:>15}")
    print(f"\nratio = median over {args.steps} rounds of (plan tok/s / padded tok/s) in the same round; "
          f"{args.threads} thread(s)")
    if "packed" in result:
        ratios = result["packed"]["ratio_to_padded_per_round"]
        print(f"packed/padded per round: {min(ratios):.3f} .. {max(ratios):.3f}")


if __name__ == "__main__":
    sys.exit(main())
