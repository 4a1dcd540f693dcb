"""The training run: config -> model + adapter + data -> steps -> checkpoints -> PEFT adapter.

Notable:

- The batch plan of each epoch is a pure function of (row lengths, ``data.seed``, epoch), so the
  position "epoch e, batch b" plus the RNG state, AdamW's moments and the step number is all a
  checkpoint needs for a resumed run to be bit-identical to an uninterrupted one.
- The learning rate is a pure function of the step (:func:`lr_at`), set on every step: no
  scheduler object whose state could drift.
- Gradient accumulation weighs each micro-batch by its share of the step's answer tokens, so
  the step's loss is the mean over all of them, as if it had been one big batch.
- Ctrl-C sets a flag; the run finishes the current step, saves a checkpoint and returns (a
  second Ctrl-C interrupts at once; the checkpoint then holds the last completed step).
- A NaN/inf loss or gradient norm stops the run before the optimizer step, so no bad update is
  ever applied or saved; the error names the step and the last good checkpoint.
- Under torchrun (see :mod:`lorakit.train.distributed`) a step is one global batch shared by the
  processes; each weighs its micro-batches by the answer tokens of the whole global batch, so the
  summed gradient is the one-process gradient. Process 0 alone writes; a lost peer is an error.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorakit.errors import LorakitError
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig, TrainConfig, save_config
from lorakit.train.distributed import Dist, is_comm_failure
from lorakit.train.loss import CausalLMLoss
from lorakit.train.progress import MetricsLog, Progress, Reporters, eta_seconds, time_summary, timed, write_plots

Callback = Callable[[str, "Run"], None]
"""Called as ``callback(event, run)`` with event ``step_start``, ``step_end`` or ``eval``."""


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


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up, then decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 1.0
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * factor)


def plan_steps(lengths: Any, data: Any, batch_size: int, per_step: int, epoch: int,
               packing: bool | None = None) -> list[list[Any]]:
    """One epoch's optimizer steps, each a list of up to ``per_step`` micro-batches (see ``plan_batches``).

    Padded: global batches of ``batch_size × per_step`` rows cut into micro-batches of
    ``batch_size``, so which rows a step trains on depends on the global batch only, not on how it
    is split into micro-batches × accumulation × processes. Packed: micro-batches of
    ``batch_size`` packed rows of up to ``max_length`` tokens, ``per_step`` consecutive ones per step.
    ``packing`` is the run's resolved choice (default: ``data.packing`` when it is true or false).
    """
    from lorakit.data.batching import plan_batches

    packing = data.packing is True if packing is None else packing
    plan = functools.partial(plan_batches, lengths, packing=packing, max_length=data.max_length,
                             seed=data.seed, epoch=epoch, group_by_length=data.group_by_length)
    if packing:
        bins = plan(batch_size=batch_size)
        return [bins[i:i + per_step] for i in range(0, len(bins), per_step)]
    return [[rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            for rows in plan(batch_size=batch_size * per_step)]


class Run:
    """One training run's live objects; :func:`train` drives it."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, tokenizer: Any, splits: Any,
                 device: torch.device, dtype: torch.dtype, dist: Dist | None = None, accum: int | None = None,
                 batching: Any = None) -> None:
        from lorakit.data.batching import Batching, micro_batch_tokens
        from lorakit.data.pipeline import pad_token_id

        self.config, self.cfg = config, config.train
        self.model, self.tokenizer, self.splits = model, tokenizer, splits
        self.device, self.dtype = device, dtype
        self.pad = pad_token_id(tokenizer)
        self.output = Path(config.output)
        self.dist = dist or Dist()
        self.batching = batching or Batching(config.data.packing is True)
        """Packed or padded batches (``data.packing: auto`` resolved by ``choose_batching``)."""
        self.accum = accum or self.cfg.grad_accum
        """Micro-batches per process and step."""
        self.global_batch = self.cfg.batch_size * self.accum * self.dist.world
        """Rows per optimizer step over all processes."""
        self.objective: torch.nn.Module = self.dist.wrap(
            CausalLMLoss(model, chunked=self.cfg.chunked_loss, chunk=self.cfg.loss_chunk,
                         offload=self.cfg.offload_activations and device.type == "cuda",
                         share_prefix=(self.cfg.share_prefix and not self.cfg.gradient_checkpointing
                                       and not self.dist.sharded and not self.batching.packed)),
            model, device)
        self.micro_tokens = micro_batch_tokens(self.cfg.micro_batch_tokens, device.type)
        """Largest micro-batch in tensor tokens (None: a planned micro-batch runs whole)."""
        self.params = [p for p in model.parameters() if p.requires_grad]
        # The fused AdamW kernel: one pass per tensor (on CPU 5× faster than the default per-op loop
        # over LoRA's hundreds of small tensors). FSDP's sharded parameters keep the default.
        fused = device.type in ("cuda", "cpu") and not self.dist.sharded
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
                                           fused=fused or None)
        data = config.data
        per_step = self.accum * self.dist.world
        self._plan = lambda epoch: plan_steps(splits.train.lengths, data, self.cfg.batch_size, per_step, epoch,
                                              packing=self.batching.packed)
        self.batches_per_epoch = sum(len(s) for s in self._plan(0))
        """Micro-batches in an epoch (the data position ``state.batch`` counts micro-batches)."""
        if self.batches_per_epoch == 0:
            raise LorakitError(f"{data.train}: no training rows")
        # Packed plans may differ by a bin from epoch to epoch: count each epoch's steps.
        self.total = self.cfg.max_steps or sum(len(self._plan(e)) for e in range(self.cfg.epochs))
        self._cached: tuple[int, list[Any], list[int]] = (-1, [], [])
        self.state = ckpt.TrainerState(config=config.to_dict(), global_batch=self.global_batch,
                                       world_size=self.dist.world, packing=self.batching.packed)
        self.stop_requested = False
        self.last_checkpoint: Path | None = None

    # -- one step -----------------------------------------------------------------------------

    def next_batches(self) -> list[Any]:
        """The row indices of the next step's micro-batches (of all processes); advances the data position."""
        if self._cached[0] != self.state.epoch:  # plans are pure functions of the epoch: compute once each
            steps = self._plan(self.state.epoch)
            self._cached = (self.state.epoch, [mb for s in steps for mb in s],
                            list(itertools.accumulate(len(s) for s in steps)))
        _, flat, ends = self._cached
        at = bisect.bisect_right(ends, self.state.batch)  # the step that holds micro-batch state.batch
        end = ends[at] if at < len(ends) else len(flat)
        chosen = flat[self.state.batch:end]
        self.state.batch = end
        if self.state.batch >= len(flat):
            self.state.epoch, self.state.batch = self.state.epoch + 1, 0
        return chosen

    def step(self, groups: list[Any]) -> tuple[float, float, int]:
        """Forward, backward and update on one step's micro-batches -> (loss, grad norm, tokens)."""
        from lorakit.data.batching import rows_of, split_batch
        from lorakit.data.collation import collate, num_label_tokens

        packed, flat, lengths = self.batching.packed, self.batching.flat, self.splits.train.lengths
        pieces = [p for g in groups for p in split_batch(g, lengths, self.micro_tokens)]
        batches = [collate(self.splits.train, p, packing=packed, flat=flat, pad_token_id=self.pad) for p in pieces]
        counts = [num_label_tokens(b) for b in batches]
        targets = sum(counts)  # answer tokens of the whole step, over all processes
        tokens = sum(int(lengths[rows_of(g)].sum()) for g in groups)  # non-pad tokens
        loss_sum = torch.zeros((), device=self.device)
        for batch, n, last in self._share(batches, counts):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            with self.dist.accumulating(self.objective, last):
                with self.autocast():
                    loss = self.objective(**batch) * (n / targets)  # mean over the step's targets
                (loss * self.dist.loss_scale).backward()
            loss_sum += loss.detach().float()
        self.dist.reduce_gradients(self.params)
        loss_value = self.dist.all_sum([float(loss_sum)], self.device)[0]
        norm = self.grad_norm()  # the gradients are the same on every process: so is the norm
        if not (math.isfinite(loss_value) and math.isfinite(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFinite(loss_value, norm)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.state.step, self.total, self.cfg)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm, tokens

    def _share(self, batches: list[dict[str, torch.Tensor]], counts: list[int]
               ) -> list[tuple[dict[str, torch.Tensor], int, bool]]:
        """This process's (micro-batch, answer tokens, is last) of the step: micro-batches r, r + W, ….

        Under DDP/FSDP every process runs the same number of forward passes, so a process short
        of micro-batches (end of an epoch) or holding one without answer tokens runs a weight-0 filler.
        """
        if not self.dist.enabled:
            mine = [(b, n) for b, n in zip(batches, counts) if n]
            return [(b, n, i == len(mine) - 1) for i, (b, n) in enumerate(mine)]
        if not any(counts):
            return []
        filler = batches[next(i for i, n in enumerate(counts) if n)]
        rank, world = self.dist.rank, self.dist.world
        slots = math.ceil(len(batches) / world)
        out = []
        for i in range(slots):
            j = rank + i * world
            useful = j < len(batches) and counts[j] > 0
            out.append((batches[j] if useful else filler, counts[j] if useful else 0, i == slots - 1))
        return out

    def grad_norm(self) -> float:
        grads = [p for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        if self.cfg.max_grad_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in grads]))

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # -- evaluation and checkpoints -----------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the answer tokens of the eval rows (None without eval data)."""
        if self.splits.eval is None or len(self.splits.eval) == 0:
            return None
        from lorakit.evaluate.core import answer_loss  # the same measure `lorakit eval` reports

        self.model.eval()
        try:  # every process evaluates all rows (same number, no exchange; FSDP needs them all anyway)
            with self.dist.unsharded(self.objective), self.autocast():
                loss = answer_loss(self.model, self.splits.eval, self.pad, self.cfg.batch_size)["loss"]
            return self.dist.from_main(loss, self.device)
        finally:
            self.model.train()

    def save(self, rng: dict[str, torch.Tensor] | None = None) -> Path:
        """Process 0 writes the checkpoint (the adapter is whole on every process); the others wait."""
        folder = self.output / "checkpoints"
        if self.dist.is_main:
            self.last_checkpoint = ckpt.save_checkpoint(folder, self.model, self.optimizer, self.state, rng)
            ckpt.prune(folder, self.cfg.keep_checkpoints, self.state.best_step)
        else:
            self.last_checkpoint = folder / f"step-{self.state.step:06d}"
        self.dist.barrier()
        return self.last_checkpoint


class NonFinite(Exception):
    """The loss or the gradient norm of a step is NaN or infinite."""

    def __init__(self, loss: float, norm: float) -> None:
        super().__init__(f"loss {loss}, gradient norm {norm}")
        self.loss, self.norm = loss, norm


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
    from lorakit.train.setup import build_run

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
    from lorakit._fs import replace_folder, write_failure, write_failures

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
                ckpt.save_weights(run.model, tmp)
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
