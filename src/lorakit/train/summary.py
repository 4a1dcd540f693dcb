"""How a training run ended, as the command line prints it (``lorakit train`` and the quickstart).

The run itself returns a :class:`~lorakit.train.loop.RunResult`; this module only turns one into
the closing lines and the process's exit status, so the quickstart (library code) and
``commands/train`` (the CLI) share it without the library importing the CLI.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorakit.train.loop import RunResult

INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def print_summary(result: RunResult) -> int:
    """Print how the run ended: where the checkpoint or the adapter is, the final losses.

    Args:
        result: what :func:`lorakit.train.loop.train` returned.

    Returns:
        The exit status: 130 when the run was interrupted (it can be resumed), else 0.
    """
    if result.stopped == "interrupted":
        print(f"interrupted at step {result.step}; checkpoint: {result.checkpoint}\n"
              f"continue with the same command and --resume auto")
        return INTERRUPTED
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
    line = f"done ({result.stopped}) after {result.step} steps: train loss {loss}"
    if result.eval_loss is not None:
        line += f", eval loss {result.eval_loss:.4f} (best at step {result.best_step})"
    print(line)
    print(f"adapter: {result.adapter}\nrun folder: {result.output} (config.yaml, metrics.jsonl, checkpoints/)")
    return 0
