"""Several processes, one run: PyTorch's own engine (torchrun, DDP, FSDP2), no cluster code of ours.

Launched by ``torchrun`` (or ``accelerate launch``, or ``lorakit train --nproc N``), every process
runs the same ``lorakit train`` and finds its place in the environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``). Without those variables nothing here does anything.

Notable:

- The global batch is defined once: ``batch_size × grad_accum × processes`` rows per optimizer
  step (or ``train.global_batch``, from which ``grad_accum`` follows). The batch plan is made of
  global batches, each cut into micro-batches of ``batch_size`` rows; process r takes micro-batches
  r, r + W, … So the data order does not depend on how many processes share the work, and a
  checkpoint written by 2 processes resumes exactly in 1 (or 4).
- Every process knows every micro-batch of the step, so the weight of a micro-batch (its answer
  tokens over the step's) needs no communication, and the summed gradient equals the gradient of
  one process that saw the whole global batch.
- ``train.distributed: ddp``: each process holds the whole model; the adapter gradients are
  all-reduced by ``DistributedDataParallel`` (``no_sync`` while accumulating). ``fsdp``: the frozen
  base is sharded with FSDP2 (``fully_shard`` per decoder layer) so a base that does not fit one
  device still trains; the adapter tensors (0.1–1 % of the parameters) stay whole on every
  process ("ignored" by FSDP) and their gradients are all-reduced here in one flat buffer, so
  optimizer state, clipping and checkpoints are the same plain tensors as on one device.
- Every process runs the same number of forward passes per step (DDP and FSDP communicate in
  them): a process short of micro-batches at the end of an epoch runs one with weight 0.
- Process 0 alone writes config, metrics, progress, checkpoints and the adapter; the others
  wait at a barrier. Collectives time out after ``train.dist_timeout`` seconds, and a lost peer
  becomes a :class:`LorakitError` naming the last checkpoint, instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
import torch

from lorakit.errors import LorakitError


@dataclass
class Dist:
    """This process's place in the run; a single process is ``Dist()`` (rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"
    timeout_s: float = 1800.0
    owns_group: bool = False
    """Whether :func:`start` created the process group (and :meth:`close` destroys it)."""
    setup_group: object = None
    """The CPU (gloo) group :meth:`main_first` waits on: its timeout is at least :data:`SETUP_TIMEOUT_S`,
    since process 0 may take long to fill the caches while the others wait (None: the default group)."""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2 shards the frozen base over the processes."""
        return self.enabled and self.strategy == "fsdp"

    @property
    def loss_scale(self) -> float:
        """DDP averages gradients over processes; scaling each loss by W turns that into a sum."""
        return float(self.world) if self.enabled and self.strategy == "ddp" else 1.0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over processes of a few numbers (as one fp64 all-reduce)."""
        if not self.enabled:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def from_main(self, value: float, device: torch.device) -> float:
        """Process 0's value on every process (decisions such as "best so far" must agree bit for bit)."""
        return self.all_sum([value if self.is_main else 0.0], device)[0] if self.enabled else value

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every process when ``flag`` is true on any (e.g. a Ctrl-C seen by one)."""
        return self.all_sum([float(flag)], device)[0] > 0 if self.enabled else flag

    @contextmanager
    def main_first(self):
        """Process 0 runs the block first (fills caches: tokenised data, converted models), then the rest.

        The others wait on :attr:`setup_group`, not under ``train.dist_timeout``: that bounds a training
        step, while tokenising a large data set or converting a model can take much longer. A process
        that dies meanwhile still ends the wait at once (its connection closes)."""
        if self.enabled and not self.is_main:
            torch.distributed.barrier(group=self.setup_group)
        yield
        if self.enabled and self.is_main:
            torch.distributed.barrier(group=self.setup_group)

    def wrap(self, objective: torch.nn.Module, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The objective as the engine needs it: DDP-wrapped, or with the model's frozen base FSDP2-sharded."""
        if not self.enabled:
            return objective
        if self.strategy == "fsdp":
            return _shard(objective, model, device, self.world)
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Every process built the same model from the same seed: no start-up broadcast of the base.
        return DistributedDataParallel(objective, device_ids=ids, init_sync=False)

    def accumulating(self, objective: torch.nn.Module, last: bool):
        """Context for one micro-batch's forward and backward: no gradient exchange until the last."""
        if self.enabled and self.strategy == "ddp" and not last:
            return objective.no_sync()
        return nullcontext()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the adapter gradients over processes (FSDP leaves them to us; DDP has done it)."""
        if not self.sharded:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        for dtype in sorted({g.dtype for g in grads}, key=str):  # one flat buffer per dtype, same order everywhere
            same = [g for g in grads if g.dtype == dtype]
            flat = torch.cat([g.reshape(-1) for g in same])
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in same:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    @contextmanager
    def unsharded(self, objective: torch.nn.Module):
        """With FSDP, gather the root parameters (embeddings, head) for a forward outside the objective."""
        if not self.sharded:
            yield
            return
        objective.unshard()
        try:
            yield
        finally:
            objective.reshard()

    def lost_peer(self, err: BaseException, step: int, last_checkpoint: str | None) -> LorakitError:
        """The message for a collective that failed because another process died or stalled."""
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(err).strip())  # drop gloo's "[…/pair.cc:537]" prefix
        first = re.split(r"(?<=\.) ", text.splitlines()[0])[0][:300] if text else type(err).__name__
        keep = (f"the last checkpoint is {last_checkpoint}" if last_checkpoint
                else "no checkpoint had been written yet")
        return LorakitError(
            f"process {self.rank} of {self.world}: lost contact with the other training processes during "
            f"step {step} ({first}). Another process probably died (see its output) or stalled for more "
            f"than train.dist_timeout = {self.timeout_s:g} s; {keep}; continue with --resume auto "
            f"(with any number of processes)")

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            try:
                torch.distributed.destroy_process_group()
            except Exception:  # a broken group (a lost peer) may refuse a clean shutdown
                pass
            self.owns_group = False


SETUP_TIMEOUT_S = 1800.0
"""Shortest wait of the processes for process 0's start-up work (:meth:`Dist.main_first`)."""


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets the same variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    """Whether this is process 0 (or the only one): the one that prints."""
    return int(os.environ.get("RANK", "0")) == 0


def start(strategy: str, timeout_s: float, device: torch.device) -> tuple[Dist, torch.device]:
    """Join the process group that the launcher describes; pick this process's device.

    Args:
        strategy: ``ddp`` or ``fsdp``.
        timeout_s: how long a collective waits for the other processes.
        device: the device ``train.device`` resolved to (cuda becomes ``cuda:LOCAL_RANK``).

    Returns:
        This process's :class:`Dist` and device.

    Raises:
        LorakitError: when the launcher's variables are incomplete or the group cannot be formed.
    """
    if not launched():
        return Dist(strategy=strategy, timeout_s=timeout_s), device
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError) as err:
        raise LorakitError(f"WORLD_SIZE is set but {err} is missing or not a number; start distributed "
                           f"runs with torchrun, accelerate launch or lorakit train --nproc N") from None
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise LorakitError(f"LOCAL_RANK {local}: this node has only {torch.cuda.device_count()} CUDA "
                               f"devices; start at most that many processes per node (--nproc-per-node)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise LorakitError(f"train.device: {device.type} does not support multi-process training; use cuda or cpu")
    dist = Dist(rank, world, local, strategy, timeout_s)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as err:  # rendezvous failures come as several exception types
            raise LorakitError(f"process {rank} of {world}: could not join the other processes "
                               f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); check "
                               f"MASTER_ADDR/MASTER_PORT (torchrun --rdzv-endpoint) and the network") from None
        dist.owns_group = True
    dist.setup_group = torch.distributed.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=max(timeout_s, SETUP_TIMEOUT_S)))
    return dist, device


def is_comm_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a collective that failed (a peer died, stalled or hung up)."""
    if isinstance(err, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe",
                                  "timed out", "timeout", "peer", "socket"))


def global_batch_note(batch_size: int, accum: int, world: int, strategy: str) -> str:
    """``global batch 8 = 2 rows × 2 accumulation × 2 processes (ddp)``: the line every run logs."""
    text = f"global batch {batch_size * accum * world} = {batch_size} rows × {accum} accumulation"
    if world > 1:
        text += f" × {world} processes ({strategy})"
    return text


def accumulation(batch_size: int, grad_accum: int, global_batch: int | None, world: int,
                 keep: int | None = None) -> tuple[int, str | None]:
    """Micro-batches per process and step, and a note when it was chosen for the user.

    Args:
        batch_size: rows per micro-batch.
        grad_accum: ``train.grad_accum``.
        global_batch: ``train.global_batch`` (None: ``batch_size × grad_accum × world``).
        world: number of processes.
        keep: the global batch of the checkpoint being resumed; kept (when ``global_batch`` is
            not set and it divides) so a run resumed on another number of processes continues exactly.

    Raises:
        LorakitError: a global batch that ``batch_size × world`` does not divide.
    """
    if global_batch is not None:
        if global_batch % (batch_size * world):
            raise LorakitError(f"train.global_batch: {global_batch} rows cannot be split into micro-batches of "
                               f"train.batch_size {batch_size} on {world} process(es); use a multiple of "
                               f"{batch_size * world}")
        accum = global_batch // (batch_size * world)
        if grad_accum not in (1, accum):
            raise LorakitError(f"train.grad_accum {grad_accum} and train.global_batch {global_batch} disagree "
                               f"(global_batch = batch_size × grad_accum × processes); set only one of them")
        return accum, None
    if keep and keep != batch_size * grad_accum * world and keep % (batch_size * world) == 0:
        accum = keep // (batch_size * world)
        return accum, (f"resume: keeping the checkpoint's global batch of {keep} rows on {world} process(es): "
                       f"train.grad_accum {grad_accum} -> {accum} (set train.global_batch to choose)")
    return grad_accum, None


def _shard(objective: torch.nn.Module, model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    trainable = [p for p in objective.parameters() if p.requires_grad]
    for p in trainable:  # FSDP moves what it shards; the ignored adapter tensors are ours to place
        if p.device != device:
            p.data = p.data.to(device)
    ignored = set(trainable)
    for layer in decoder_blocks(model):
        fully_shard(layer, mesh=mesh, ignored_params=ignored & set(layer.parameters()))
    fully_shard(objective, mesh=mesh, ignored_params=ignored)
    return objective


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks (to shard or compile one by one): the classes transformers names as
    not-to-split, else the children of its largest ``ModuleList``; empty when it has neither."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m lorakit.cli ARGV``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit.cli", *argv]

