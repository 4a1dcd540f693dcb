"""lorakit.train: from a config to a trained PEFT-format adapter, with nothing lost on the way.

- :mod:`~lorakit.train.config`: ``RunConfig`` and its sections, YAML + ``key=value`` overrides.
- :mod:`~lorakit.train.loop`: the run (``train``), the step, evaluation, Ctrl-C and NaN handling.
- :mod:`~lorakit.train.checkpoints`: atomic checkpoints, resume, pruning.
- :mod:`~lorakit.train.progress`: progress bar, ``metrics.jsonl``, trackers, plots.
- :mod:`~lorakit.train.summary`: how a run ended, as printed, and its exit status.
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
    from lorakit.train.loop import RunResult as RunResult, lr_at as lr_at, train as train

_LAZY = {
    "RunConfig": "lorakit.train.config",
    "AdapterConfig": "lorakit.train.config",
    "TrainConfig": "lorakit.train.config",
    "load_config": "lorakit.train.config",
    "train": "lorakit.train.loop",
    "RunResult": "lorakit.train.loop",
    "lr_at": "lorakit.train.loop",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
