"""Base model vs each adapter on the same data, plus the forgetting check, in one report dict.

The base is measured with every adapter disabled; each adapter alone (``set_active([name])``).
Forgetting is the change of the loss on general text (every token counts) from the base to the
adapter: a positive change means the adapter made the model worse at ordinary English. The
default text is :data:`GENERAL_ENGLISH`, a bundled sample (see ``general_english_NOTICE.txt``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from lorakit.data.pipeline import pad_token_id
from lorakit.evaluate.core import EvalConfig, EvalData, answer_loss, evaluate, read_eval_data
from lorakit.inject import active_adapters, disabled, set_active

GENERAL_ENGLISH = str(Path(__file__).with_name("general_english.jsonl"))
BASE = "base"


def compare(model: Any, tokenizer: Any, adapters: list[str], data: str, config: EvalConfig | None = None,
            general: str | None = GENERAL_ENGLISH, general_limit: int | None = None,
            sources: dict[str, str] | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Evaluate the base and each adapter loaded on ``model`` on ``data`` (and general text).

    Args:
        model: the base model with ``adapters`` loaded by name.
        tokenizer: its tokenizer.
        adapters: adapter names to compare with the base.
        data: the task's evaluation file.
        config: evaluation settings.
        general: plain-text file for the forgetting check (``{"text": …}`` rows); None skips it.
        general_limit: use only its first N rows.
        sources: adapter name -> folder, recorded in the report.
        show_progress: draw a progress bar on stderr.

    Returns:
        The report: ``models`` (one entry per model: loss, perplexity, metrics, general_loss,
        forgetting), ``metrics`` (names), ``examples`` (per example: prompt, reference, each
        model's output and scores), and the settings.
    """
    config = config or EvalConfig()
    started = time.time()
    task = read_eval_data(data, tokenizer, config)
    text = None
    if general is not None:
        text = read_eval_data(general, tokenizer, EvalConfig(max_length=config.max_length, limit=general_limit,
                                                             generate=False), text=True)
    names = [BASE, *adapters]
    per_model = len(task.rows) + (len(task.examples) if config.generate else 0) + (len(text.rows) if text else 0)
    bar = _progress_bar(per_model * len(names), show_progress)
    results: dict[str, dict[str, Any]] = {}
    active = active_adapters(model)
    for name in names:
        bar.set_description(name)
        if name == BASE:
            with disabled(model):
                results[name] = _measure(model, tokenizer, task, text, config, bar.update, pad_token_id(tokenizer))
        else:
            set_active(model, [name])
            results[name] = _measure(model, tokenizer, task, text, config, bar.update, pad_token_id(tokenizer))
    bar.close()
    set_active(model, active)  # leave the model as it came
    return build_report(results, names, task, config, data, general=general, sources=sources,
                        seconds=time.time() - started)


def _measure(model, tokenizer, task, text, config, progress, pad) -> dict[str, Any]:
    result = evaluate(model, tokenizer, task, config, progress)
    if text is not None:
        general = answer_loss(model, text.rows, pad, config.batch_size, progress)
        result["general_loss"] = general["loss"]
        result["general_tokens"] = general["tokens"]
    return result


def build_report(results: dict[str, dict[str, Any]], names: list[str], task: EvalData, config: EvalConfig, data: str,
                 *, general: str | None = None, sources: dict[str, str] | None = None,
                 seconds: float = 0.0) -> dict[str, Any]:
    """The report :func:`compare` returns, from each model's :func:`~lorakit.evaluate.core.evaluate`
    result (plus ``general_loss``/``general_tokens`` when the forgetting check ran).

    Args:
        results: model name -> its measurement.
        names: the models in report order; changes are measured from ``names[0]`` (the base).
        task: the evaluation data as read (its examples give prompts and references).
        config: the settings used.
        data: the data file's name as the report shows it.
        general: the general text's file name, when the forgetting check ran.
        sources: model name -> adapter folder.
        seconds: how long the measurement took.
    """
    sources = sources or {}
    reference = names[0]
    base = results[reference]
    models = []
    for name in names:
        r = results[name]
        entry = {"name": name, "adapter": sources.get(name), "loss": r["loss"], "perplexity": r["perplexity"],
                 "tokens": r["tokens"], "rows": r["rows"], "metrics": r.get("metrics", {})}
        if "general_loss" in r:
            entry["general_loss"] = r["general_loss"]
            if name != reference:
                delta = r["general_loss"] - base["general_loss"]
                entry["forgetting"] = {"delta": delta, "relative": delta / base["general_loss"]}
        if name != reference:
            entry["loss_delta"] = r["loss"] - base["loss"]
        models.append(entry)
    examples = []
    for i, ex in enumerate(task.examples if "predictions" in base else []):
        examples.append({
            "where": ex.where, "line": ex.line, "prompt": ex.prompt[-1]["content"] if ex.prompt else "",
            "reference": ex.reference,
            "outputs": {n: results[n]["predictions"][i] for n in names},
            "scores": {n: results[n]["scores"][i] for n in names},
        })
    return {
        "data": data, "general": general, "rows": len(task.rows), "examples_generated": len(examples),
        "answer_tokens": base["tokens"], "general_tokens": base.get("general_tokens"),
        "metrics": list(base.get("metrics", {})), "models": models, "examples": examples,
        "settings": {"batch_size": config.batch_size, "max_length": config.max_length, "limit": config.limit,
                     "max_new_tokens": base.get("max_new_tokens"), "decoding": "greedy"},
        "seconds": round(seconds, 1),
    }


def _progress_bar(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="row", disable=not show, leave=False, dynamic_ncols=True)
