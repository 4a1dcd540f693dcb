"""The evaluation report as Markdown, JSON, a per-example JSONL file and a PNG bar chart.

Files written by :func:`write_reports` (each written beside its target and renamed, so a folder
never holds half a report):

- ``report.md``: the base-vs-adapters table, the forgetting check, sample answers, and the
  lm-evaluation-harness scores (``lorakit eval --tasks``);
- ``report.json``: every number, per model;
- ``examples.jsonl``: per example, the prompt, the reference, each model's answer and scores;
- ``report.png``: losses (left) and generation metrics (right) as grouped bars (needs
  matplotlib; skipped with a note if it is missing; not written for lm-eval tasks alone);
- ``report.html``: all of it in one self-contained page that opens offline — the measures, a
  chart and every example side by side with its differences marked (:mod:`lorakit.evaluate.html`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorakit._fs import atomic_write, atomic_write_text
from lorakit.evaluate import html

LABELS = {"exact_match": "exact match", "normalized_match": "normalised match", "contains": "contains",
          "json_valid": "JSON valid", "json_schema": "JSON schema valid"}


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _signed(value: float, digits: int = 3) -> str:
    return f"{value:+.{digits}f}"


def table(report: dict[str, Any]) -> str:
    """The Markdown table: one row per measure, base then each adapter (with its change)."""
    models = report["models"]
    base = models[0]
    header = ["measure", "base"] + [f"{m['name']} (Δ)" for m in models[1:]]
    rows = [["answer loss ↓", *[_cell(m, base, "loss") for m in models]],
            ["perplexity ↓", *[_cell(m, base, "perplexity", digits=2) for m in models]]]
    for name in report["metrics"]:
        rows.append([f"{LABELS.get(name, name)} ↑", *[_pct_cell(m, base, name) for m in models]])
    if "general_loss" in base:
        rows.append(["general-text loss ↓", *[_forget_cell(m, base) for m in models]])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(model: dict, base: dict, key: str, digits: int = 3) -> str:
    value = model[key]
    if model is base:
        return _num(value, digits)
    return f"{_num(value, digits)} ({_signed(value - base[key], digits)})"


def _pct_cell(model: dict, base: dict, name: str) -> str:
    value = model["metrics"].get(name)
    if value is None:
        return "–"
    if model is base:
        return f"{value:.1%}"
    return f"{value:.1%} ({(value - base['metrics'][name]) * 100:+.1f} pts)"


def _forget_cell(model: dict, base: dict) -> str:
    if model is base:
        return _num(model["general_loss"])
    f = model["forgetting"]
    return f"{_num(model['general_loss'])} ({_signed(f['delta'])}, {f['relative']:+.1%})"


def task_table(report: dict[str, Any]) -> str:
    """The lm-eval scores as a Markdown table: one row per task and metric, base then each adapter (Δ)."""
    names = [m["name"] for m in report["models"]]
    header = ["task", "metric", *[n if i == 0 else f"{n} (Δ)" for i, n in enumerate(names)]]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(names)]
    for task, metrics in report["lm_eval"]["results"].items():
        for metric, entry in metrics.items():
            arrow = {True: " ↑", False: " ↓"}.get(entry["higher_is_better"], "")
            values = entry["values"]
            base = values.get(names[0])
            cells = []
            for i, name in enumerate(names):
                value = values.get(name)
                if value is None:
                    cells.append("–")
                elif i == 0 or base is None:
                    cells.append(_num(value, 4))
                else:
                    cells.append(f"{_num(value, 4)} ({_signed(value - base, 4)})")
            lines.append(f"| {task} | {metric}{arrow} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _task_section(report: dict[str, Any]) -> list[str]:
    run = report["lm_eval"]
    notes = [f"lm-eval {run['lm_eval_version']}"]
    if run.get("limit"):
        notes.append(f"first {run['limit']} documents per task")
    if run.get("num_fewshot") is not None:
        notes.append(f"{run['num_fewshot']}-shot")
    return ["## lm-evaluation-harness", "", f"Tasks: {', '.join(run['tasks'])} ({'; '.join(notes)}; "
            f"{run['seconds']} s).", "", task_table(report), ""]


def markdown(report: dict[str, Any], samples: int = 3) -> str:
    """The whole Markdown report."""
    if report.get("data") is None:  # lm-eval tasks only
        return "\n".join(["# Evaluation report", "", *_task_section(report)])
    lines = ["# Evaluation report", "",
             f"Data: `{report['data']}` — {report['rows']} rows, {report['answer_tokens']:,} answer tokens"
             + (f", {report['examples_generated']} answers generated (greedy, at most "
                f"{report['settings']['max_new_tokens']} new tokens)" if report["examples_generated"] else ""),
             ""]
    if report.get("general"):
        lines += [f"Forgetting check: loss on general text `{Path(report['general']).name}` "
                  f"({report['general_tokens']:,} tokens); a positive change means the adapter made the "
                  "model worse at ordinary text.", ""]
    lines += [table(report), ""]
    verdicts = [_verdict(m, report["models"][0]) for m in report["models"][1:]]
    lines += [f"- {v}" for v in verdicts] + [""]
    if report["examples"]:
        lines += ["## Sample answers", ""]
        for ex in report["examples"][:samples]:
            lines += [f"**{ex['where']}** — prompt: {_quote(ex['prompt'])}", "",
                      f"- reference: {_quote(ex['reference'])}"]
            lines += [f"- {name}: {_quote(text)}" for name, text in ex["outputs"].items()]
            lines.append("")
    if report.get("lm_eval"):
        lines += _task_section(report)
    lines.append(f"_{report['seconds']} s; decoding: {report['settings']['decoding']}._")
    return "\n".join(lines) + "\n"


def _verdict(model: dict, base: dict) -> str:
    change = model["loss"] - base["loss"]
    word = "lower" if change < 0 else "higher"
    text = f"**{model['name']}**: answer loss {abs(change):.3f} {word} than the base"
    if "forgetting" in model:
        text += f"; general-text loss {model['forgetting']['relative']:+.1%}"
    return text + "."


def _quote(text: str, width: int = 160) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return "`" + (text if len(text) <= width else text[: width - 1] + "…").replace("`", "'") + "`"


def chart(report: dict[str, Any], path: str | Path) -> bool:
    """Grouped bars: losses on the left, generation metrics (0–1) on the right. False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = report["models"]
    losses = [("answer loss", "loss")] + ([("general-text loss", "general_loss")] if "general_loss" in models[0] else [])
    metrics = report["metrics"]
    panels = 2 if metrics else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 + 3 * panels, 4), squeeze=False)
    width = 0.8 / len(models)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, groups, getter, title in (
        (axes[0][0], [label for label, _ in losses], lambda m, i: m[losses[i][1]], "loss (lower is better)"),
        (axes[0][-1] if metrics else None, [LABELS.get(n, n) for n in metrics],
         lambda m, i: m["metrics"][metrics[i]], "generation metrics (higher is better)"),
    ):
        if ax is None:
            continue
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(groups))]
            ys = [getter(m, i) for i in range(len(groups))]
            bars = ax.bar(xs, ys, width, label=m["name"], color=colors[j % len(colors)])
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    if metrics:
        axes[0][-1].set_ylim(0, 1.1)
    axes[0][0].legend(fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(report: dict[str, Any], folder: str | Path) -> list[Path]:
    """Write report.md, report.json, examples.jsonl, report.html and report.png into ``folder``; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    summary = {k: v for k, v in report.items() if k != "examples"}
    texts = {"report.md": markdown(report), "report.json": json.dumps(summary, indent=2, allow_nan=True) + "\n",
             "examples.jsonl": "".join(json.dumps(ex, ensure_ascii=False) + "\n" for ex in report["examples"]),
             "report.html": html.document(report)}
    for name, text in texts.items():
        atomic_write_text(folder / name, text)
        written.append(folder / name)
    if report.get("data") is not None and (chart_path := _atomic_chart(report, folder / "report.png")):
        written.append(chart_path)
    return written


def _atomic_chart(report: dict[str, Any], target: Path) -> Path | None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        return None
    atomic_write(target, lambda p: chart(report, p))
    return target
