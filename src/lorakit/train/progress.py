"""What a run shows and records: the progress bar, ``metrics.jsonl``, optional trackers, plots.

- On a terminal, a tqdm bar with step, loss, learning rate, tokens/s and ETA; otherwise (a log
  file, CI) one plain line every ``log_every`` steps with the same fields.
- ``metrics.jsonl``: one JSON object per logged step (``step, epoch, loss, lr, grad_norm, tokens,
  tokens_per_s, elapsed_s``) and per evaluation (``step, eval_loss``). On resume, rows after the
  checkpoint's step are dropped first, so the file reads as one uninterrupted run.
- ``report_to``: TensorBoard, Weights & Biases, trackio, each imported only when asked for.
- Plots (``loss.png``, ``lr.png``) drawn from ``metrics.jsonl`` at the end with matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
import time
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
    """A live bar on a terminal, plain lines elsewhere, silent when ``quiet``."""

    def __init__(self, total: int, start: int, log_every: int, quiet: bool = False) -> None:
        self.total, self.start, self.log_every, self.quiet = total, start, log_every, quiet
        self.began = time.perf_counter()
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s", refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.perf_counter() - self.began) / done * (self.total - step) if done else math.nan
            print(f"step {step}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s  "
                  f"eta {format_seconds(eta)}", flush=True)

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
