"""The one entry point, ``lorakit``: a table from subcommand to the module that runs it.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its command runs, so ``lorakit --help`` never imports torch. A :class:`LorakitError`
prints as ``error: message`` (exit 2); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit import __version__
from lorakit.errors import LorakitError

# name -> (module, one-line help). Keep sorted by the order a user meets them.
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("lorakit.commands.data", "check a data file: format, counts, token lengths, answer masks"),
    "train": ("lorakit.commands.train", "train an adapter from a YAML config (no config: the built-in quickstart)"),
    "eval": ("lorakit.commands.eval", "measure adapters against the base: loss, generations, forgetting; report + chart"),
    "merge": ("lorakit.commands.merge", "merge an adapter into its base: a standalone transformers model folder"),
    "combine": ("lorakit.commands.combine", "one adapter from several (cat, linear, svd, ties, dare, magnitude_prune)"),
    "export": ("lorakit.commands.export", "an adapter for llama.cpp or Ollama: a GGUF LoRA adapter or merged GGUF model"),
    "serve": ("lorakit.commands.serve", "OpenAI-compatible HTTP server: one base model, many adapters, one batch"),
    "inspect": ("lorakit.commands.inspect", "what an adapter folder holds (ranks, targets, size, vLLM fit)"),
    "spectrum": ("lorakit.commands.spectrum", "rank weight matrices by signal-to-noise; select the best ones to train"),
    "estimate": ("lorakit.commands.estimate", "memory plan for a training run: does it fit, and what to change"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning: train, evaluate, merge, combine and serve PEFT-format adapters.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.set_defaults(_module=module)
        _lazy_arguments(module, command)
    return parser


def _lazy_arguments(module: str, parser: argparse.ArgumentParser) -> None:
    # Argument definitions live beside each command; their modules import heavy libraries only
    # inside run(), so importing them here stays cheap.
    importlib.import_module(module).add_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LorakitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit inspect … | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
