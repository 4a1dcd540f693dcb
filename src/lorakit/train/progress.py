"""What a run shows and records: the progress bar, ``metrics.jsonl``, optional trackers, plots.

- On a terminal, a tqdm bar with step, loss, learning rate, tokens/s and ETA; otherwise (a log
  file, CI) one plain line every ``log_every`` steps with the same fields.
- ``metrics.jsonl``: one JSON object per logged step (``step, epoch, loss, lr, grad_norm, tokens,
  tokens_per_s, train_s, elapsed_s``: the rate is over ``train_s``, the time spent in training steps;
  ``elapsed_s`` is the wall time with evaluations and checkpoints) and per evaluation
  (``step, eval_loss, eval_s``). On resume, rows after the
  checkpoint's step are dropped first, so the file reads as one uninterrupted run.
- ``report_to``: TensorBoard, Weights & Biases, trackio, each imported only when asked for.
- Plots (``loss.png``, ``lr.png``) drawn from ``metrics.jsonl`` at the end with matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

_INSTALL = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}


class MetricsLog:
    """Appends rows to ``metrics.jsonl`` (flushed per row, so a crash loses nothing)."""

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is None:
            self.path.write_text("")
        else:  # keep the rows up to the checkpoint; the resumed run rewrites the rest
            rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self._file = self.path.open("a")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (an empty list if there is no file)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Progress:
    """A live bar on a terminal, plain lines elsewhere, silent when ``quiet``.

    The tokens/s and the ETA it shows come from the training loop: the rate over training time only
    (evaluation and checkpoints excluded, so it does not drop after each evaluation), and the time
    left at that rate plus the remaining evaluations at their mean time.
    """

    def __init__(self, total: int, start: int, log_every: int, quiet: bool = False) -> None:
        self.total, self.start, self.log_every, self.quiet = total, start, log_every, quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            # tqdm's own remaining-time estimate would count evaluations as training: ours is in the postfix.
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, eta: float = math.nan) -> None:
        if self.quiet:
            return
        fields = f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  eta {format_seconds(eta)}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(fields, refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            print(f"step {step}/{self.total}  {fields}", flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextmanager
def timed(record: Any, field: str):
    """Add the block's wall time to ``record.<field>`` (a run's training, evaluation or checkpoint time)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(record, field, getattr(record, field) + time.perf_counter() - start)


def eta_seconds(step: int, total: int, train_s: float, evals_left: int = 0, eval_s: float = 0.0,
                evals: int = 0) -> float:
    """Time left: the remaining steps at the training rate so far, plus the remaining evaluations at
    their mean time so far (none counted before the first); NaN before the first step."""
    if step == 0:
        return math.nan
    left = (total - step) * train_s / step
    if evals:
        left += evals_left * eval_s / evals
    return left


def time_summary(state: Any) -> str:
    """The line a run ends with: training time and rate, then evaluation and checkpoint time apart."""
    rate = state.tokens / state.train_s if state.train_s > 0 else 0.0
    line = (f"training: {state.step} steps, {state.tokens:,} tokens in {format_seconds(state.train_s)} "
            f"({rate:,.0f} tokens/s)")
    if state.evals:
        line += f"; evaluation: {format_seconds(state.eval_s)} ({state.evals}×)"
    if state.checkpoint_s:
        line += f"; checkpoints: {format_seconds(state.checkpoint_s)}"
    return line


def format_seconds(seconds: float) -> str:
    """``1:02:03`` / ``2:03``; ``?`` when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def check_reporters(names: list[str]) -> None:
    """Fail early (before loading anything) when a tracker in ``report_to`` is not installed."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(_INSTALL[name]) is None:
            raise LorakitError(f"train.report_to: {name} is not installed (pip install {_INSTALL[name]}), "
                               f"or remove it from report_to")


class Reporters:
    """Forwards metrics to the trackers named in ``train.report_to``."""

    def __init__(self, names: list[str], output: Path, config: dict[str, Any]) -> None:
        self.writers: list[tuple[str, Any]] = []
        for name in names:
            try:
                self.writers.append((name, _open_reporter(name, output, config)))
            except ImportError:
                raise LorakitError(f"train.report_to: {name} is not installed (pip install {_INSTALL[name]}), "
                                   f"or remove it from report_to") from None

    def log(self, row: dict[str, Any], step: int) -> None:
        values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for name, writer in self.writers:
            if name == "tensorboard":
                for key, value in values.items():
                    writer.add_scalar(key, value, step)
            else:
                writer.log(values, step=step)

    def close(self) -> None:
        for name, writer in self.writers:
            if name == "tensorboard":
                writer.close()
            else:
                writer.finish()


def _open_reporter(name: str, output: Path, config: dict[str, Any]) -> Any:
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(output / "tensorboard"))
    if name == "wandb":
        import wandb

        wandb.init(project="lorakit", name=output.name, config=config, dir=str(output))
        return wandb
    import trackio

    trackio.init(project="lorakit", name=output.name, config=config)
    return trackio


def write_plots(metrics_path: str | Path, folder: str | Path) -> list[Path]:
    """Draw ``loss.png`` (train and eval loss by step) and ``lr.png`` from ``metrics.jsonl``.

    Returns:
        The files written; empty when matplotlib is not installed or there is nothing to draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    lrs = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if not train:
        return []
    folder = Path(folder)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss.png", dpi=100)
    written.append(folder / "loss.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(*zip(*lrs))
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "lr.png", dpi=100)
    written.append(folder / "lr.png")
    plt.close(fig)
    return written
