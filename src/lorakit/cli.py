"""The one entry point, ``lorakit``: a table from subcommand to the module that runs it.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; it is imported
only when its command runs, so ``lorakit --help`` never imports torch.

What a failure prints is decided here, once, for every command (so no command can leak a
traceback): a :class:`LorakitError` prints as ``error: message`` (exit 2); an operating-system
error on a named file (missing, no permission, disk full, file too large) prints the file and the
reason (exit 2); anything else is a bug in lorakit and prints one line naming the command and how
to get the traceback (exit 1). ``--debug`` (or ``LORAKIT_DEBUG=1``) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
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

DEBUG_ENV = "LORAKIT_DEBUG"
REPORT_TO = "the lorakit issue tracker"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning: train, evaluate, merge, combine and serve PEFT-format adapters.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"show full tracebacks for errors (or set {DEBUG_ENV}=1)")
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
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except LorakitError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit inspect … | head`
        return 0
    except OSError as err:
        if debug:
            raise
        if err.filename is None:  # not about a file the user named: treat as a bug
            return _unexpected(args.command, err)
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - the one place that turns a bug into one line
        if debug:
            raise
        return _unexpected(args.command, err)


def os_error_message(err: OSError) -> str:
    """``PATH: reason; what to do`` for an operating-system error on a named file."""
    hints = {errno.ENOENT: "check the path", errno.EACCES: "check its permissions",
             errno.EISDIR: "a file was expected, not a folder", errno.ENOTDIR: "a folder was expected",
             errno.ENOSPC: "free space on that disk or write elsewhere",
             errno.EFBIG: "the file-size limit (ulimit -f) was hit; raise it or write elsewhere",
             errno.EROFS: "the file system is read-only; write elsewhere"}
    where = err.filename if err.filename2 is None else f"{err.filename} -> {err.filename2}"
    reason = err.strerror or type(err).__name__
    hint = hints.get(err.errno or 0)
    return f"{where}: {reason}" + (f"; {hint}" if hint else "")


def _unexpected(command: str, err: BaseException) -> int:
    print(f"error: `lorakit {command}` failed unexpectedly ({type(err).__name__}: {_one_line(err)}). "
          f"This is a bug in lorakit, not in your input: rerun with `lorakit --debug {command} …` "
          f"(or {DEBUG_ENV}=1) for the traceback and report it to {REPORT_TO}.", file=sys.stderr)
    return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


if __name__ == "__main__":
    sys.exit(main())
