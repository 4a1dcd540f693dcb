"""``train()``: the entry of lorakit.train. A config -> a :class:`~lorakit.train.run.Run` (built by
:mod:`lorakit.train.setup`) -> steps -> checkpoints -> the PEFT adapter -> a :class:`RunResult`.

Notable:

- The loop owns what happens between steps: evaluation, early stopping, when to checkpoint, the
  metrics, trackers and progress bar; :class:`~lorakit.train.run.Run` owns the step itself.
- Ctrl-C sets a flag; the run finishes the current step, saves a checkpoint and returns (a
  second Ctrl-C interrupts at once; the checkpoint then holds the last completed step).
- A NaN/inf loss or gradient norm stops the run before the optimizer step, so no bad update is
  ever applied or saved; the error names the step and the last good checkpoint.
- Under torchrun (see :mod:`lorakit.train.distributed`) process 0 alone writes; a lost peer is an
  error naming the last checkpoint, never a hang.
"""

from __future__ import annotations

import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit._fs import replace_folder, write_failure, write_failures
from lorakit.errors import LorakitError
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig
from lorakit.train.distributed import is_comm_failure
from lorakit.train.progress import MetricsLog, Progress, Reporters, eta_seconds, time_summary, timed, write_plots
from lorakit.train.run import NonFinite, Run, lr_at
from lorakit.train.setup import build_run
from lorakit.train.summary import RunResult

Callback = Callable[[str, Run], None]
"""Called as ``callback(event, run)`` with event ``step_start``, ``step_end`` or ``eval``."""


def train(config: RunConfig, callbacks: list[Callback] | None = None, quiet: bool = False) -> RunResult:
    """Train the adapter that ``config`` describes; see the module docstring.

    Args:
        config: the validated run config.
        callbacks: called at ``step_start``, ``step_end`` and ``eval`` with the :class:`Run`.
        quiet: no progress output (metrics are still written).

    Returns:
        How the run ended and where the adapter is.

    Raises:
        LorakitError: bad config or data, a resume that does not fit, or a NaN/inf loss.
    """
    run, resume_from = build_run(config, quiet=quiet)
    try:
        return _drive(run, resume_from, callbacks, quiet)
    except Exception as err:
        if run.dist.enabled and is_comm_failure(err):  # a peer died or stalled: say so, never hang
            last = ckpt.list_checkpoints(run.output / "checkpoints")
            raise run.dist.lost_peer(err, run.state.step + 1, str(last[-1]) if last else None) from None
        raise
    finally:
        run.dist.close()


def _drive(run: Run, resume_from: Path | None, callbacks: list[Callback] | None, quiet: bool) -> RunResult:
    config = run.config
    if run.dist.is_main:
        out = _Sinks(MetricsLog(run.output / "metrics.jsonl", resume_step=run.state.step if resume_from else None),
                     Reporters(run.cfg.report_to, run.output, config.to_dict()),
                     Progress(run.total, run.state.step, run.cfg.log_every, quiet))
    else:  # metrics, trackers and the progress bar come from process 0 only
        out = _Sinks(_NoMetrics(), Reporters([], run.output, {}), Progress(run.total, run.state.step, 1, quiet=True))
    if resume_from:
        out.progress.message(f"resumed from {resume_from} at step {run.state.step}")
    stopped, train_loss, eval_loss = "completed", None, None
    began = time.perf_counter() - run.state.elapsed_s
    try:
        with _sigint_flag(run):
            run.model.train()
            while run.state.step < run.total and stopped == "completed":
                rng = ckpt.rng_state()  # the state a checkpoint of "before this step" must hold
                position = (run.state.epoch, run.state.batch)
                try:
                    for cb in callbacks or []:
                        cb("step_start", run)
                    with timed(run.state, "train_s"):  # tokens/s and the ETA count training time only
                        train_loss, norm, tokens = run.step(run.next_batches())
                except KeyboardInterrupt:  # a second Ctrl-C, or one raised by a callback
                    run.state.epoch, run.state.batch = position
                    run.optimizer.zero_grad(set_to_none=True)
                    run.state.elapsed_s = time.perf_counter() - began
                    run.save(rng)
                    stopped = "interrupted"
                    break
                except NonFinite as bad:
                    raise _nan_error(run, bad) from None
                run.state.step += 1
                run.state.tokens += tokens
                run.state.elapsed_s = time.perf_counter() - began
                _record_step(run, train_loss, norm, out)
                for cb in callbacks or []:
                    cb("step_end", run)
                step, done = run.state.step, run.state.step == run.total
                improved = False
                if _evaluates_at(run, step):
                    eval_loss = _evaluate(run, out, callbacks)
                    improved = eval_loss is not None and run.state.best_step == step
                    if _patience_exhausted(run):
                        out.progress.message(f"early stopping at step {step}: no better eval loss in "
                                             f"{run.cfg.early_stopping_patience} evaluations")
                        stopped = "early_stopping"
                if run.dist.any(run.stop_requested, run.device):  # a Ctrl-C seen by any process stops all
                    stopped = "interrupted"
                if done or improved or stopped != "completed" or (run.cfg.save_every and step % run.cfg.save_every == 0):
                    with timed(run.state, "checkpoint_s"):
                        run.save()
        out.progress.message(time_summary(run.state))
    finally:
        out.close()
    adapter = None
    if stopped != "interrupted":
        if run.dist.is_main:
            adapter = _final_adapter(run)
            if run.cfg.plots:
                write_plots(run.output / "metrics.jsonl", run.output)
        else:
            adapter = run.output / "adapter"
        run.dist.barrier()  # when train() returns, the adapter is there for every process
    return RunResult(run.output, adapter, stopped, run.state.step, train_loss, eval_loss, run.state.best_step,
                     run.last_checkpoint)


@dataclass
class _Sinks:
    """Where a run's numbers go."""

    metrics: MetricsLog | _NoMetrics
    reporters: Reporters
    progress: Progress

    def log(self, row: dict[str, Any], step: int) -> None:
        self.metrics.write(row)
        self.reporters.log(row, step)

    def close(self) -> None:
        self.progress.close()
        self.metrics.close()
        self.reporters.close()


class _NoMetrics:
    """The metrics file of a process other than 0: nothing is written."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def _evaluates_at(run: Run, step: int) -> bool:
    return bool((run.cfg.eval_every and step % run.cfg.eval_every == 0) or step == run.total)


def _eta(run: Run) -> float:
    state = run.state
    evals_left = (sum(_evaluates_at(run, s) for s in range(state.step + 1, run.total + 1))
                  if run.splits.eval is not None else 0)
    return eta_seconds(state.step, run.total, state.train_s, evals_left, state.eval_s, state.evals)


def _record_step(run: Run, loss: float, norm: float, out: _Sinks) -> None:
    state = run.state
    lr = lr_at(state.step - 1, run.total, run.cfg)
    tokens_per_s = state.tokens / max(state.train_s, 1e-9)  # over training time: no eval, no checkpoints
    if state.step % run.cfg.log_every == 0 or state.step == run.total:
        out.log({"step": state.step, "epoch": round(state.epoch + state.batch / run.batches_per_epoch, 4),
                 "loss": loss, "lr": lr, "grad_norm": norm, "tokens": state.tokens, "tokens_per_s": tokens_per_s,
                 "train_s": round(state.train_s, 3), "elapsed_s": round(state.elapsed_s, 3)}, state.step)
    out.progress.update(state.step, loss, lr, tokens_per_s, _eta(run))


def _evaluate(run: Run, out: _Sinks, callbacks: list[Callback] | None) -> float | None:
    state = run.state
    start = time.perf_counter()
    value = run.evaluate()
    if value is None:
        return None
    if state.best_eval_loss is None or value < state.best_eval_loss:
        state.best_eval_loss, state.best_step, state.evals_without_improvement = value, state.step, 0
    else:
        state.evals_without_improvement += 1
    for cb in callbacks or []:
        cb("eval", run)
    seconds = time.perf_counter() - start  # the evaluation's time, its callbacks included: not training time
    state.eval_s += seconds
    state.evals += 1
    out.log({"step": state.step, "eval_loss": value, "eval_s": round(seconds, 3)}, state.step)
    out.progress.message(f"step {state.step}: eval loss {value:.4f} "
                         f"(best {state.best_eval_loss:.4f} at step {state.best_step}) in {seconds:.1f} s")
    return value


def _patience_exhausted(run: Run) -> bool:
    patience = run.cfg.early_stopping_patience
    return patience is not None and run.state.evals_without_improvement >= patience


def _final_adapter(run: Run) -> Path:
    """Write ``output/adapter``: the best checkpoint's adapter with ``keep_best``, else the last one.

    A failed write (a full disk, a file-size limit) leaves the previous adapter whole and names the
    checkpoint that holds the trained weights, from which ``--resume auto`` writes the adapter.
    """
    target, tmp = run.output / "adapter", run.output / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    best = run.state.best_step
    source = run.output / "checkpoints" / f"step-{best:06d}" if best is not None else None
    try:
        with write_failures(target):
            if run.cfg.keep_best and source is not None and best != run.state.step and source.is_dir():
                tmp.mkdir(parents=True)
                for name in ckpt.WEIGHT_FILES:
                    if (source / name).is_file():
                        shutil.copy2(source / name, tmp / name)
            else:
                run.save_weights(run.model, tmp)
            replace_folder(tmp, target)  # the previous adapter stays whole until the new one is complete
    except LorakitError as err:
        failure = write_failure(target, err.__cause__) if err.__cause__ is not None else err
        if failure is None or run.last_checkpoint is None:
            raise
        raise LorakitError(f"{failure}. The trained weights are safe in {run.last_checkpoint}: run the same "
                           "command with --resume auto to write the adapter from it without training again"
                           ) from err.__cause__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _nan_error(run: Run, bad: NonFinite) -> LorakitError:
    step = run.state.step + 1
    what = "loss" if not math.isfinite(bad.loss) else "gradient norm"
    value = bad.loss if what == "loss" else bad.norm
    last = ckpt.list_checkpoints(run.output / "checkpoints")
    keep = (f"the last good checkpoint is {last[-1]} (resume=PATH continues from it)" if last
            else "no checkpoint had been written yet")
    return LorakitError(f"step {step}: the {what} is {value}; training stopped before applying the update; "
                        f"{keep}. Lower train.lr, check the data, or use train.dtype: fp32")


@contextmanager
def _sigint_flag(run: Run):
    """First Ctrl-C: finish the step, save, stop. Second: KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if run.stop_requested:
            raise KeyboardInterrupt
        run.stop_requested = True
        print("\nCtrl-C: finishing this step and saving a checkpoint (press again to stop at once)", flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
