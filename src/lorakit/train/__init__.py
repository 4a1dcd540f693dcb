"""lorakit.train: from a config to a trained PEFT-format adapter, with nothing lost on the way.

- :mod:`~lorakit.train.config`: ``RunConfig`` and its sections, YAML + ``key=value`` overrides.
- :mod:`~lorakit.train.loop`: ``train()``, the entry: the loop over steps, evaluation, early
  stopping, Ctrl-C and NaN handling; it builds the run through :mod:`~lorakit.train.setup` (device,
  data, model, adapter, resume) and drives a :class:`~lorakit.train.run.Run` (the step, the schedule).
- :mod:`~lorakit.train.spectrum`: ``spectrum:N`` targets and ``method: spectrum`` in a run.
- :mod:`~lorakit.train.checkpoints`: atomic checkpoints, resume, pruning.
- :mod:`~lorakit.train.progress`: progress bar, ``metrics.jsonl``, trackers, plots.
- :mod:`~lorakit.train.summary`: ``RunResult``, how a run ended, and its closing lines.
- :mod:`~lorakit.train.quickstart`: ``lorakit train`` without a config.

Names are imported lazily so ``import lorakit.train`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the lazy table below, for type checkers and editors (tests/test_lazy_exports.py)
    from lorakit.train.config import (
        AdapterConfig as AdapterConfig, RunConfig as RunConfig, TrainConfig as TrainConfig, load_config as load_config,
    )
    from lorakit.train.loop import train as train
    from lorakit.train.run import lr_at as lr_at
    from lorakit.train.summary import RunResult as RunResult

_LAZY = {
    "RunConfig": "lorakit.train.config",
    "AdapterConfig": "lorakit.train.config",
    "TrainConfig": "lorakit.train.config",
    "load_config": "lorakit.train.config",
    "train": "lorakit.train.loop",
    "RunResult": "lorakit.train.summary",
    "lr_at": "lorakit.train.run",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
