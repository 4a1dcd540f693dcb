"""One training run's live objects and its step: data position, forward/backward/update, evaluation,
checkpoints. :func:`lorakit.train.setup.build_run` builds a :class:`Run`; :func:`lorakit.train.loop.train`
drives it.

Notable:

- The batch plan of each epoch is a pure function of (row lengths, ``data.seed``, epoch)
  (:func:`plan_steps`), so the position "epoch e, batch b" plus the RNG state, AdamW's moments and the
  step number is all a checkpoint needs for a resumed run to be bit-identical to an uninterrupted one.
- The learning rate is a pure function of the step (:func:`lr_at`), set on every step: no
  scheduler object whose state could drift.
- Gradient accumulation weighs each micro-batch by its share of the step's answer tokens, so
  the step's loss is the mean over all of them, as if it had been one big batch.
- Under torchrun a step is one global batch shared by the processes; each weighs its micro-batches
  by the answer tokens of the whole global batch, so the summed gradient is the one-process gradient.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from lorakit.data.batching import Batching, micro_batch_tokens, plan_batches, rows_of, split_batch
from lorakit.data.collation import collate, num_label_tokens
from lorakit.data.pipeline import pad_token_id
from lorakit.errors import LorakitError
from lorakit.evaluate.core import answer_loss  # the same measure `lorakit eval` reports
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig, TrainConfig
from lorakit.train.distributed import Dist
from lorakit.train.loss import CausalLMLoss
from lorakit.train.spectrum import weights_writer

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
    packing = data.packing is True if packing is None else packing
    plan = functools.partial(plan_batches, lengths, packing=packing, max_length=data.max_length,
                             seed=data.seed, epoch=epoch, group_by_length=data.group_by_length)
    if packing:
        bins = plan(batch_size=batch_size)
        return [bins[i:i + per_step] for i in range(0, len(bins), per_step)]
    return [[rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
            for rows in plan(batch_size=batch_size * per_step)]


class Run:
    """One training run's live objects; :func:`lorakit.train.loop.train` drives it."""

    def __init__(self, config: RunConfig, model: torch.nn.Module, tokenizer: Any, splits: Any,
                 device: torch.device, dtype: torch.dtype, dist: Dist | None = None, accum: int | None = None,
                 batching: Any = None) -> None:
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
        self.save_weights = weights_writer(config)
        """Writes the trained weights into a folder: the PEFT adapter, or a Spectrum selection."""

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
            self.last_checkpoint = ckpt.save_checkpoint(folder, self.model, self.optimizer, self.state, rng,
                                                           self.save_weights)
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
