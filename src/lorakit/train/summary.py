"""How a training run ended: :class:`RunResult`, what :func:`lorakit.train.loop.train` returns.

The library returns the result and its closing lines (:meth:`RunResult.summary`); the command
line (``commands/train``) prints them and turns the result into the process's exit status.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class RunResult:
    """How a run ended and where its outputs are."""

    output: Path
    adapter: Path | None
    """The final PEFT adapter folder (the best one when evaluating with ``keep_best``)."""
    stopped: str
    """``completed``, ``early_stopping`` or ``interrupted``."""
    step: int
    train_loss: float | None
    eval_loss: float | None
    best_step: int | None
    checkpoint: Path | None
    """The latest checkpoint written."""

    @property
    def interrupted(self) -> bool:
        """True when the run stopped at Ctrl-C (it can be resumed from :attr:`checkpoint`)."""
        return self.stopped == "interrupted"

    def summary(self) -> str:
        """The closing lines: where the checkpoint or the adapter is, the final losses."""
        if self.interrupted:
            return (f"interrupted at step {self.step}; checkpoint: {self.checkpoint}\n"
                    f"continue with the same command and --resume auto")
        loss = f"{self.train_loss:.4f}" if self.train_loss is not None else "-"
        line = f"done ({self.stopped}) after {self.step} steps: train loss {loss}"
        if self.eval_loss is not None:
            line += f", eval loss {self.eval_loss:.4f} (best at step {self.best_step})"
        return f"{line}\nadapter: {self.adapter}\nrun folder: {self.output} (config.yaml, metrics.jsonl, checkpoints/)"
