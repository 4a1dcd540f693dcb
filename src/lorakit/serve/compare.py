"""Base and adapters on one data file, through the serving engine: what the page's compare view runs.

It measures what ``lorakit eval`` measures (:mod:`lorakit.evaluate`), with the engine that serves
the requests:

- the file is read by :func:`~lorakit.evaluate.core.read_eval_data` (every lorakit data format,
  the chat template, training's answer masks);
- each example's answer is generated greedily from :func:`~lorakit.evaluate.core.generation_prompt`
  with eval's budget (:func:`~lorakit.evaluate.core.default_max_new_tokens`), stripped as eval
  strips it, and scored by eval's metric functions;
- the answer-token loss is :func:`~lorakit.evaluate.core.answer_loss` on the engine's own model with
  the adapter's slot active (:meth:`~lorakit.serve.engine.Engine.exclusive`).

The result has the shape of :func:`lorakit.evaluate.compare`'s report (built by the same
:func:`~lorakit.evaluate.comparison.build_report`, without the forgetting check), so
:mod:`lorakit.evaluate.html` renders both.

Notable:

- Generations are ordinary engine requests, submitted example by example for every model, so one
  batch mixes the base and the adapters (and other clients' requests); at most ``max_batch`` of
  them wait in the engine at a time, so a long file does not starve other clients.
- Loss forwards run between engine steps, one batch of rows at a time.
- ``cancel`` (a :class:`threading.Event`) stops the job within a step and cancels its requests.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from lorakit.data.pipeline import pad_token_id
from lorakit.errors import LorakitError
from lorakit.evaluate.comparison import build_report
from lorakit.evaluate.core import (EvalConfig, EvalData, answer_loss, default_max_new_tokens, generation_prompt,
                                   metric_functions, read_eval_data, score_predictions)
from lorakit.serve.engine import Engine
from lorakit.serve.registry import AdapterSlotsBusyError
from lorakit.serve.sampling import SamplingParams

Progress = Callable[[int, int], None]


class CompareCancelled(LorakitError):
    """The comparison was stopped (its client went away)."""


def compare_on_engine(engine: Engine, models: dict[str, str | None], data: str, config: EvalConfig | None = None, *,
                      label: str | None = None, progress: Progress | None = None,
                      cancel: threading.Event | None = None) -> dict[str, Any]:
    """Measure each of ``models`` on ``data`` with ``engine``, as ``lorakit eval`` measures.

    Args:
        engine: the serving engine with the adapters loaded (started here if it is not running).
        models: the name each model has in the report -> the adapter it runs (None: the base), in
            report order; changes are measured from the first.
        data: the data file (any format ``lorakit eval`` reads).
        config: the evaluation settings (limit, budget, metrics, batch size, format, template).
        label: the file's name in the report and in messages (default: ``data``).
        progress: called with ``(done, total)`` units of work (one answer or one row's loss),
            first with ``done=0`` once the file is read.
        cancel: when set, the job stops and cancels its requests.

    Returns:
        The report (see :func:`lorakit.evaluate.compare`).

    Raises:
        LorakitError: a bad file (its row named), an unknown adapter, a failed generation.
        CompareCancelled: ``cancel`` was set.
    """
    config = config or EvalConfig()
    label = label or data
    started = time.time()
    try:
        task = read_eval_data(data, engine.tokenizer, config)
    except LorakitError as err:
        raise LorakitError(str(err).replace(data, label)) from None
    if not len(task.rows):
        raise LorakitError(f"{label}: no rows to evaluate")
    generate = config.generate and bool(task.examples)
    work = _Work(len(models) * ((len(task.examples) if generate else 0) + len(task.rows)), progress, cancel)
    results: dict[str, dict[str, Any]] = {}
    running_before = engine.running_in_background
    engine.start()
    try:
        if generate:
            budget = config.max_new_tokens or default_max_new_tokens(engine.tokenizer, task.examples)
            functions = metric_functions(config, [e.reference for e in task.examples])
            answers = _answers(engine, task, models, budget, work, label)
        for name, adapter in models.items():
            results[name] = _loss(engine, task, adapter, config.batch_size, work)
            if generate:
                means, per = score_predictions(answers[name], task.examples, functions)
                results[name].update(metrics=means, predictions=answers[name], scores=per, max_new_tokens=budget)
    finally:
        if not running_before:
            engine.stop()
    sources = {name: engine.registry.info(adapter).path for name, adapter in models.items() if adapter is not None}
    report = build_report(results, list(models), task, config, label, sources=sources, seconds=time.time() - started)
    for example in report["examples"]:
        example["where"] = example["where"].replace(data, label)
    return report


class _Work:
    """Progress counting and the cancel check."""

    def __init__(self, total: int, progress: Progress | None, cancel: threading.Event | None) -> None:
        self.total, self.done, self.progress, self.cancel = total, 0, progress, cancel
        self.report(0)

    def report(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.total)

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise CompareCancelled("the comparison was cancelled")


def _answers(engine: Engine, task: EvalData, models: dict[str, str | None], budget: int, work: _Work,
             label: str) -> dict[str, list[str]]:
    """Every model's greedy answer to every example, through the engine (at most ``max_batch`` queued)."""
    prompts = [generation_prompt(engine.tokenizer, task.template, ex) for ex in task.examples]
    for ex, ids in zip(task.examples, prompts):
        if len(ids) >= engine.max_context:
            raise LorakitError(f"{ex.where.replace(task.path, label)}: the prompt is {len(ids)} tokens; this "
                               f"server's context is {engine.max_context}")
    answers = {name: [""] * len(prompts) for name in models}
    jobs = iter([(name, i) for i in range(len(prompts)) for name in models])  # one example's models together
    finished: queue.Queue[tuple[str, int]] = queue.Queue()
    pending = {}

    def submit(job: tuple[str, int]) -> None:
        name, i = job
        params = SamplingParams(max_tokens=min(budget, engine.max_context - len(prompts[i])), temperature=0)
        pending[job] = engine.submit(prompt_ids=prompts[i], adapter=models[name], params=params,
                                     on_event=lambda event: event.finished and finished.put(job),
                                     request_id=f"compare-{name}-{i}")

    try:
        for job in itertools.islice(jobs, engine.max_batch):
            submit(job)
        while pending:
            work.check()
            try:
                job = finished.get(timeout=0.1)
            except queue.Empty:
                continue
            completion = pending.pop(job).completion
            name, i = job
            if completion.finish_reason in ("error", "cancelled"):
                raise LorakitError(f"{name} on {task.examples[i].where.replace(task.path, label)}: the generation "
                                   f"{'failed: ' + str(completion.error) if completion.error else 'was cancelled'}")
            answers[name][i] = completion.text.strip()  # as lorakit eval decodes
            work.report(1)
            if (following := next(jobs, None)) is not None:
                submit(following)
    finally:
        for handle in pending.values():
            handle.cancel()
    return answers


def _loss(engine: Engine, task: EvalData, adapter: str | None, batch_size: int, work: _Work) -> dict[str, Any]:
    """Answer-token loss over ``task.rows`` as :func:`answer_loss` computes it, one engine pause per batch."""
    rows = task.rows
    pad = pad_token_id(engine.tokenizer)
    order = sorted(range(len(rows)), key=lambda i: -int(rows.lengths[i]))  # as answer_loss batches them
    total, tokens = 0.0, 0
    row_losses: list[float | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        part = _exclusive_loss(engine, adapter, rows.select(chunk), pad, work)
        for j, i in enumerate(chunk):
            row_losses[i] = part["row_losses"][j]
        if part["tokens"]:
            total += part["loss"] * part["tokens"]
            tokens += part["tokens"]
        work.report(len(chunk))
    mean = total / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if tokens and mean < 700 else float("inf"),
            "tokens": tokens, "rows": len(rows), "row_losses": row_losses}


def _exclusive_loss(engine: Engine, adapter: str | None, rows: Any, pad: int, work: _Work) -> dict[str, Any]:
    while True:
        work.check()
        try:
            with engine.exclusive(adapter, len(rows)) as model:
                return answer_loss(model, rows, pad, batch_size=len(rows))
        except AdapterSlotsBusyError:  # running requests pin every slot: wait for one to finish
            time.sleep(0.05)
