"""Training checkpoints: written whole or not at all, found again for ``resume``, pruned.

A checkpoint is a folder ``checkpoints/step-000040/`` holding

- the adapter in PEFT format (``adapter_config.json``, ``adapter_model.safetensors``), so any
  checkpoint is also a usable adapter;
- ``optimizer.safetensors``: AdamW's moment tensors plus the RNG states (no pickle anywhere);
- ``trainer_state.json``, written last: step, data position, schedule, best eval loss, the
  optimizer's hyper-parameters, and the run config.

Atomicity: everything is written into ``checkpoints/.tmp-step-…`` (files fsynced), then the folder
is renamed into place in one rename (:func:`lorakit._fs.atomic_folder`). A crash or ``kill -9`` at
any moment leaves either the complete checkpoint or a ``.tmp-*`` folder, which is never read and is
removed the next time.
A folder counts as a checkpoint only if its name is ``step-N`` and ``trainer_state.json`` exists.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit._fs import atomic_folder
from lorakit.adapter_io import save_adapter
from lorakit.adapters.config import CONFIG_NAME as ADAPTER_CONFIG
from lorakit.adapters.peft_format import WEIGHTS_NAME as ADAPTER_WEIGHTS
from lorakit.errors import LorakitError
from lorakit.spectrum_model import CONFIG_NAME as SPECTRUM_CONFIG, WEIGHTS_NAME as SPECTRUM_WEIGHTS

WeightsWriter = Callable[[torch.nn.Module, Path], object]
"""Writes a run's trained weights into a folder: a checkpoint's, the final ``adapter``."""

STATE_FILE = "trainer_state.json"
TENSORS_FILE = "optimizer.safetensors"
_NAME = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where a run stands after ``step`` optimizer steps: everything but tensors."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Epoch the next batch comes from."""
    batch: int = 0
    """Index of the next micro-batch in that epoch's plan (exact mid-epoch resume, on any number of processes)."""
    tokens: int = 0
    """Non-pad input tokens trained on so far."""
    best_eval_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    elapsed_s: float = 0.0
    """Wall time of the run before this checkpoint (training, evaluation and checkpoints)."""
    train_s: float = 0.0
    """Time spent in training steps (for tokens/s and the ETA, also after a resume)."""
    eval_s: float = 0.0
    """Time spent evaluating (callbacks of the ``eval`` event included)."""
    evals: int = 0
    """Evaluations done."""
    checkpoint_s: float = 0.0
    """Time spent writing checkpoints."""
    global_batch: int = 0
    """Rows per optimizer step over all processes (0: not recorded); a resume keeps it by default."""
    world_size: int = 1
    """Processes that trained up to here (the data position does not depend on it)."""
    packing: bool | None = None
    """Whether the batches were packed (the resolved ``data.packing``; None: not recorded)."""
    config: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(folder: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: TrainerState, rng: dict[str, torch.Tensor] | None = None,
                    save_weights: WeightsWriter = save_adapter) -> Path:
    """Write ``folder/step-N`` atomically (N = ``state.step``), replacing one of the same step.

    Args:
        folder: the run's ``checkpoints`` folder.
        model: the model with the trained adapter ``default`` (or a Spectrum selection).
        optimizer: its optimizer (AdamW).
        state: the position and bookkeeping to store.
        rng: RNG states to store (default: the current ones, see :func:`rng_state`).
        save_weights: writes the trained weights into the folder (the run's
            :func:`lorakit.train.spectrum.weights_writer`; default: the PEFT adapter).

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    final = folder / f"step-{state.step:06d}"
    # Filled under .tmp-step-N-…, every file fsynced, then renamed into place (a step saved again,
    # e.g. Ctrl-C right after a save, replaces the old folder whole).
    with atomic_folder(final, prefix=f".tmp-{final.name}-", fsync=True) as tmp:
        save_weights(model, tmp)
        tensors, groups = _optimizer_tensors(optimizer)
        for key, value in (rng if rng is not None else rng_state()).items():
            tensors[f"rng.{key}"] = value
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        payload = {**asdict(state), "param_groups": groups, "format": 1}
        (tmp / STATE_FILE).write_text(json.dumps(payload, indent=1))
    return final


WEIGHT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, SPECTRUM_CONFIG, SPECTRUM_WEIGHTS)
"""The files of a checkpoint that its ``save_weights`` wrote (those present are the final adapter)."""


def load_checkpoint(path: str | Path, optimizer: torch.optim.Optimizer | None = None
                    ) -> tuple[TrainerState, dict[str, torch.Tensor]]:
    """Read a checkpoint's state, restore ``optimizer`` from it, and return the stored RNG states.

    The adapter weights are loaded separately (``lorakit.adapter_io.load_adapter``).

    Raises:
        LorakitError: when ``path`` is not a complete checkpoint or does not fit the optimizer.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / STATE_FILE).is_file() or not (path / TENSORS_FILE).is_file():
        raise LorakitError(f"{path}: not a complete lorakit checkpoint (no {STATE_FILE} or {TENSORS_FILE})")
    payload = json.loads((path / STATE_FILE).read_text())
    groups = payload.pop("param_groups")
    payload.pop("format", None)
    state = TrainerState(**payload)
    tensors = load_file(str(path / TENSORS_FILE))
    rng = {k[len("rng."):]: v for k, v in tensors.items() if k.startswith("rng.")}
    if optimizer is not None:
        _restore_optimizer(optimizer, tensors, groups, path)
    return state, rng


def list_checkpoints(folder: str | Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest step first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_resume(setting: str, output: str | Path) -> Path | None:
    """The checkpoint that ``resume: setting`` names.

    Args:
        setting: ``auto`` (the latest in ``output/checkpoints``, None if there is none), a
            checkpoint folder, or a run folder (its latest checkpoint).
        output: the run folder.

    Raises:
        LorakitError: when a named folder holds no checkpoint.
    """
    if setting == "auto":
        found = list_checkpoints(Path(output) / "checkpoints")
        return found[-1] if found else None
    path = Path(setting)
    if (path / STATE_FILE).is_file():
        return path
    for inner in (path / "checkpoints", path):
        found = list_checkpoints(inner)
        if found:
            return found[-1]
    raise LorakitError(f"resume: {path} is neither a checkpoint (with {STATE_FILE}) nor a run folder with checkpoints")


def prune(folder: str | Path, keep: int, best_step: int | None) -> None:
    """Delete all but the ``keep`` latest checkpoints and the best one; clear stale ``.tmp-*`` folders."""
    folder = Path(folder)
    found = list_checkpoints(folder)
    for path in found[:-keep] if keep else found:
        if best_step is not None and path.name == f"step-{best_step:06d}":
            continue
        shutil.rmtree(path, ignore_errors=True)
    for path in folder.glob(".tmp-*"):
        shutil.rmtree(path, ignore_errors=True)


def rng_state() -> dict[str, torch.Tensor]:
    """The torch RNG states (CPU and every CUDA device) as uint8 tensors."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    cuda = [states[k] for k in sorted(k for k in states if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# -- optimizer state as flat tensors + JSON --------------------------------------------------------


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for index, slots in sd["state"].items():
        for key, value in slots.items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict],
                       source: Path) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, slot = key.split(".", 2)
            state.setdefault(int(index), {})[slot] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != [len(g["params"]) for g in groups]:
        raise LorakitError(f"{source}: the checkpoint's optimizer holds {[len(g['params']) for g in groups]} "
                           f"parameters per group, this run has {sizes}; was the adapter config changed?")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, RuntimeError) as err:
        raise LorakitError(f"{source}: the optimizer state does not fit this run: {err}") from None

