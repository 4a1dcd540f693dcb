"""``lorakit train [CONFIG] [key=value …] [--resume auto|DIR]``: train an adapter.

Without CONFIG it runs the built-in quickstart (SmolLM2-135M-Instruct learns to answer word
definitions as one line of JSON), printing the base model's and the adapter's results side by side.
Exit status: 0 done, 2 user error, 130 interrupted (a checkpoint was saved).

Several processes: start it under ``torchrun`` (or ``accelerate launch``), or give ``--nproc N``,
which starts ``torchrun --standalone --nproc-per-node N`` with the same arguments on this machine.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lorakit.commands.flags import positive_int

if TYPE_CHECKING:
    from lorakit.train.summary import RunResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("items", nargs="*", metavar="[CONFIG] [key=value]",
                        help="a YAML config file, then overrides such as train.lr=1e-4 data.max_length=1024")
    parser.add_argument("--resume", metavar="auto|DIR",
                        help="continue from the latest checkpoint in the output folder (auto) or from DIR")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    parser.add_argument("--nproc", type=positive_int, metavar="N",
                        help="train with N processes on this machine (one per GPU): runs torchrun for you")


INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def run(args: argparse.Namespace) -> int:
    from lorakit.errors import LorakitError
    from lorakit.train.config import load_config

    items = list(args.items)
    path = items.pop(0) if items and "=" not in items[0] else None
    if args.nproc is not None:
        return _launch(args, path, items)
    for item in items:
        if "=" not in item:
            raise LorakitError(f"{item!r}: expected key=value after the config file (e.g. train.lr=1e-4)")
    if args.resume:
        items.append(f"resume={args.resume}")
    if path is None:
        return run_quickstart(items, quiet=args.quiet)
    from lorakit.train.distributed import is_main_process
    from lorakit.train.loop import train

    result = train(load_config(path, items), quiet=args.quiet)
    if not is_main_process():  # under torchrun, process 0 reports for all
        return INTERRUPTED if result.interrupted else 0
    return report(result)


def run_quickstart(overrides: list[str] | None = None, quiet: bool = False) -> int:
    """``lorakit train`` without a config: the quickstart, then its summary; the exit status."""
    from lorakit.train.quickstart import quickstart

    return report(quickstart(overrides, quiet=quiet))


def report(result: RunResult) -> int:
    """Print how the run ended (:meth:`RunResult.summary`); the exit status: 130 when it was
    interrupted (it can be resumed), else 0."""
    print(result.summary())
    return INTERRUPTED if result.interrupted else 0


def _launch(args: argparse.Namespace, path: str | None, items: list[str]) -> int:
    """Re-run this command under torchrun with ``--nproc`` processes; its exit status."""
    import os
    import subprocess

    from lorakit.errors import LorakitError
    from lorakit.train.config import load_config
    from lorakit.train.distributed import launched, torchrun_command

    if args.nproc < 1:
        raise LorakitError(f"--nproc: expected a number of processes >= 1, got {args.nproc}")
    if path is None:
        raise LorakitError("--nproc needs a CONFIG file (the quickstart runs in one process)")
    if launched():
        raise LorakitError("--nproc inside torchrun: the launcher already started the processes; drop --nproc")
    load_config(path, items)  # a bad config is reported once, here, not by every process
    argv = (["--debug"] if getattr(args, "debug", False) else []) + ["train", path, *items]
    argv += (["--resume", args.resume] if args.resume else []) + (["--quiet"] if args.quiet else [])
    command = torchrun_command(args.nproc, argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    if not args.quiet:
        print("running: " + " ".join(command[1:]), flush=True)
    return subprocess.call(command, env=env)
