"""lorakit.evaluate: measure a model or adapter — loss, perplexity, generations, forgetting, reports.

- :func:`evaluate` (``core``): one model as it is now on one data file; the callable that
  ``lorakit eval`` and the final evaluation of ``lorakit train`` use.
- :func:`compare` (``comparison``): the base and each loaded adapter side by side, with the
  forgetting check on general English (:data:`GENERAL_ENGLISH`).
- :func:`write_reports` (``report``): Markdown, JSON, per-example JSONL and a PNG chart.
- ``metrics``: exact/normalised match, contains, JSON validity and schema, user functions.

Names are imported lazily so ``import lorakit.evaluate`` does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the lazy table below, for type checkers and editors (tests/test_lazy_exports.py)
    from lorakit.evaluate.comparison import GENERAL_ENGLISH as GENERAL_ENGLISH, compare as compare
    from lorakit.evaluate.core import (
        EvalConfig as EvalConfig, EvalData as EvalData, answer_loss as answer_loss, evaluate as evaluate,
        generate as generate, read_eval_data as read_eval_data,
    )
    from lorakit.evaluate.report import markdown as markdown, write_reports as write_reports

_LAZY = {
    "EvalConfig": "lorakit.evaluate.core",
    "EvalData": "lorakit.evaluate.core",
    "read_eval_data": "lorakit.evaluate.core",
    "evaluate": "lorakit.evaluate.core",
    "answer_loss": "lorakit.evaluate.core",
    "generate": "lorakit.evaluate.core",
    "compare": "lorakit.evaluate.comparison",
    "GENERAL_ENGLISH": "lorakit.evaluate.comparison",
    "write_reports": "lorakit.evaluate.report",
    "markdown": "lorakit.evaluate.report",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_exports(__name__, _LAZY)
