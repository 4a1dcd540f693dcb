"""lm-evaluation-harness tasks on the base model and each adapter, in process, side by side.

lm-eval (the optional extra: ``pip install 'lorakit[lm-eval]'``) is the standard tool adapters are
scored with. :func:`run_tasks` gives its HF model wrapper (``HFLM``) the one model object that
holds the adapters, and runs the tasks with every adapter off (the base) and then with each adapter
alone (:func:`lorakit.set_active`), so the numbers are lm-eval's own, the same as
``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER`` gives (the serving tests check the
served adapters against exactly that).

Tasks come from lm-eval's registry (when their data is available: a hub data set needs the hub or
its local cache) or from your own task YAMLs in ``include_path`` (``dataset_path: json`` and
``dataset_kwargs: {data_files: …}`` work offline; as everywhere in lm-eval, relative ``data_files``
are relative to the working folder).

Notable: ``HFLM`` re-ties the model's embeddings when it is built; the weights are tied already and
lorakit's adapter layers around the embedding and head would hide the names transformers looks
for, so the config's ``tie_word_embeddings`` is held off while it is built (and put back).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.inject import active_adapters, disabled, set_active

BASE = "base"
INSTALL = "pip install 'lorakit[lm-eval]'"


def require() -> Any:
    """The ``lm_eval`` module.

    Raises:
        LorakitError: lm-eval is not installed (the message says how to install it).
    """
    try:
        import lm_eval
    except ImportError:
        raise LorakitError(f"--tasks runs lm-evaluation-harness, which is not installed; install it with: {INSTALL}") \
            from None
    return lm_eval


def task_manager(include_path: str | None = None) -> Any:
    """lm-eval's task index, with the task YAMLs in ``include_path`` added."""
    require()
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise LorakitError(f"--include-path {include_path}: no such folder (it should hold lm-eval task YAMLs)")
    return TaskManager(verbosity="ERROR", include_path=include_path)


def check_tasks(manager: Any, tasks: list[str]) -> None:
    """Raises a LorakitError naming each task lm-eval does not know, with the closest names."""
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; give --include-path DIR for your own task YAMLs"
            raise LorakitError(f"--tasks {task}: lm-eval knows no task or group of that name{hint}")


def run_tasks(model: Any, tokenizer: Any, adapters: list[str], tasks: list[str], *, include_path: str | None = None,
              limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
              manager: Any = None) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the base (adapters off) and each adapter alone.

    Args:
        model: the base model with ``adapters`` loaded by name (left as it came).
        tokenizer: its tokenizer.
        adapters: adapter names to compare with the base.
        tasks: lm-eval task or group names.
        include_path: a folder of extra task YAMLs.
        limit: only the first N documents of each task.
        num_fewshot: few-shot examples (default: each task's own).
        batch_size: lm-eval's batch size.
        manager: a :func:`task_manager` already built (else one is).

    Returns:
        ``{"tasks", "lm_eval_version", "limit", "num_fewshot", "seconds", "results"}`` where
        ``results[task][metric]`` holds ``values`` and ``stderr`` per model name and ``higher_is_better``.

    Raises:
        LorakitError: lm-eval missing, an unknown task.
    """
    lm_eval = require()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(include_path)
    check_tasks(manager, tasks)
    started = time.time()
    with _untied(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    runs: dict[str, dict[str, Any]] = {}
    active = active_adapters(model) if adapters else []
    try:
        for name in [BASE, *adapters]:
            if name != BASE:
                set_active(model, [name])
            with disabled(model) if name == BASE else contextlib.nullcontext(), _quiet():
                runs[name] = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                                     num_fewshot=num_fewshot)
    finally:
        if adapters:
            set_active(model, active)
    return {"tasks": list(tasks), "lm_eval_version": getattr(lm_eval, "__version__", None), "limit": limit,
            "num_fewshot": num_fewshot, "seconds": round(time.time() - started, 1), "results": _collect(runs)}


def _collect(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{task: {metric: {"values": {model: x}, "stderr": {model: s}, "higher_is_better": b}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for model, run in runs.items():
        better = run.get("higher_is_better", {})
        for task, metrics in run["results"].items():
            for key, value in metrics.items():
                metric, _, kind = key.partition(",")
                if not kind or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                    continue
                label = metric if kind == "none" else f"{metric} ({kind})"
                entry = out.setdefault(task, {}).setdefault(label, {
                    "values": {}, "stderr": {}, "higher_is_better": better.get(task, {}).get(metric)})
                entry["values"][model] = float(value)
                stderr = metrics.get(f"{metric}_stderr,{kind}")
                entry["stderr"][model] = float(stderr) if isinstance(stderr, (int, float)) else None
    return out


@contextlib.contextmanager
def _untied(model: Any) -> Iterator[None]:
    config = getattr(model, "config", None)
    tied = getattr(config, "tie_word_embeddings", None)
    if tied:
        config.tie_word_embeddings = False
    try:
        yield
    finally:
        if tied:
            config.tie_word_embeddings = tied


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval logs each request batch at INFO/WARNING; the report says what matters."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
