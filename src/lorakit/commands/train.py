"""``lorakit train [CONFIG] [key=value …] [--resume auto|DIR]``: train an adapter.

Without CONFIG it runs the built-in quickstart (SmolLM2-135M-Instruct learns to answer word
definitions as one line of JSON), printing the base model's and the adapter's results side by side.
Exit status: 0 done, 2 user error, 130 interrupted (a checkpoint was saved).
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]",
                        help="a YAML config file, then overrides such as train.lr=1e-4 data.max_length=1024")
    parser.add_argument("--resume", metavar="auto|DIR",
                        help="continue from the latest checkpoint in the output folder (auto) or from DIR")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.train.config import load_config

    items = list(args.items)
    path = items.pop(0) if items and "=" not in items[0] else None
    for item in items:
        if "=" not in item:
            raise LorakitError(f"{item!r}: expected key=value after the config file (e.g. train.lr=1e-4)")
    if args.resume:
        items.append(f"resume={args.resume}")
    if path is None:
        from lorakit.train.quickstart import run_quickstart

        return run_quickstart(items, quiet=args.quiet)
    from lorakit.train.loop import train

    config = load_config(path, items)
    result = train(config, quiet=args.quiet)
    return report(result)


def report(result) -> int:
    """Print how the run ended; the exit status (130 when interrupted)."""
    if result.stopped == "interrupted":
        print(f"interrupted at step {result.step}; checkpoint: {result.checkpoint}\n"
              f"continue with the same command and --resume auto")
        return 130
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
    line = f"done ({result.stopped}) after {result.step} steps: train loss {loss}"
    if result.eval_loss is not None:
        line += f", eval loss {result.eval_loss:.4f} (best at step {result.best_step})"
    print(line)
    print(f"adapter: {result.adapter}\nrun folder: {result.output} (config.yaml, metrics.jsonl, checkpoints/)")
    return 0
