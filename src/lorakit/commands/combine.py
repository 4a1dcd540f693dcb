"""``lorakit combine DIR DIR … --weights W W … --method METHOD [--rank K] [--density D] --out DIR``.

One PEFT-format adapter from several, computed on the weight updates ΔW (see
:mod:`lorakit.combine`). No base model is needed: everything comes from the adapter files.
"""

from __future__ import annotations

import argparse

from lorakit.commands.flags import density, finite_float, non_negative_int, positive_int

COMBINE_METHODS = ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # = lorakit.combine.COMBINE_METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapters", nargs="+", metavar="DIR", help="adapter folders (PEFT format), same base model")
    parser.add_argument("--weights", nargs="+", type=finite_float, metavar="W",
                        help="one weight per adapter (default 1.0 each)")
    parser.add_argument("--method", default="cat", choices=COMBINE_METHODS,
                        help="cat (exact, rank = sum of ranks; default), linear (exact weighted sum), svd (best "
                             "rank-K approximation), ties, dare_linear, dare_ties, magnitude_prune")
    parser.add_argument("--rank", type=positive_int, metavar="K",
                        help="rank of the result (default: exact for linear, the largest input rank otherwise)")
    parser.add_argument("--density", type=density, metavar="D",
                        help="share of entries kept by ties/dare/magnitude_prune (default 0.5)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the DARE masks (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the combined adapter")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    from lorakit.combine import DEFAULT_DENSITY, NEEDS_DENSITY, combine_folders

    result = combine_folders(args.adapters, args.out, args.weights, method=args.method, rank=args.rank,
                             density=args.density, seed=args.seed, overwrite=args.force)
    config = result.config
    weights = args.weights or [1.0] * len(args.adapters)
    ranks = sorted({c.A.shape[0] for c in result.modules.values()})
    print(f"combined {len(args.adapters)} adapters with {args.method} "
          f"(weights {', '.join(f'{w:g}' for w in weights)}"
          + (f", density {args.density or DEFAULT_DENSITY:g}" if args.method in NEEDS_DENSITY else "") + ")")
    print(f"  {len(result.modules)} modules, rank {', '.join(map(str, ranks))}, scaling 1 (lora_alpha = r)")
    if args.method == "cat" or result.min_kept_energy > 1 - 1e-9:
        print("  exact: the adapter's update equals the combination of the inputs' updates")
    else:
        print(f"  rank-K refactoring keeps {result.mean_kept_energy:.1%} of the combined update's energy on "
              f"average (worst module {result.min_kept_energy:.1%}); raise --rank to keep more")
    print(f"  written to {args.out}  (base: {config.base_model_name_or_path or 'not recorded'})")
    return 0
