"""The evaluation report as HTML: one self-contained page (``report.html``) and the fragment the
server's compare view shows, from the same report dict (:func:`lorakit.evaluate.compare`).

What it shows, top to bottom:

- the data file, its size and the decoding settings;
- the measures table: one row per measure (answer loss, perplexity, each generation metric,
  the general-text loss when the forgetting check ran), one column per model, each value with
  its change from the first model (the base) and the best value of the row marked;
- a chart as inline SVG: losses (lower is better) and generation metrics (higher is better);
- with ``lorakit eval --tasks``: lm-evaluation-harness's scores, per task and metric and model;
- per example: the prompt, the reference and each model's answer, the words where an answer
  departs from the reference highlighted (a word-level diff), and its metric scores; a checkbox
  shows only the examples on which the models disagree (CSS only).

Notable:

- Every text from the data or a model is escaped (``html.escape``): an answer cannot inject markup.
- No JavaScript, no external resource: the page carries its CSS inline and a Content-Security-Policy
  that forbids loading anything, so it opens the same offline, from a mail attachment, or in a
  browser with scripts off. The server's page links the same stylesheet (``report.css``).
- Numbers keep full precision in ``data-value`` attributes; the visible text rounds them
  (losses to 4 decimals, perplexity to 2, metrics to 0.1 %).
"""

from __future__ import annotations

import difflib
import math
import re
from html import escape
from pathlib import Path
from typing import Any

CSS_FILE = Path(__file__).with_name("report.css")
COLORS = ("#64748b", "#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2", "#dc2626")
"""Model colours in report order (the base first): the chart's fills, and ``.lk-c0``… in report.css
(classes, not style attributes, so the page's Content-Security-Policy needs no inline styles)."""
LABELS = {"loss": "answer loss", "perplexity": "perplexity", "general_loss": "general-text loss",
          "exact_match": "exact match", "normalized_match": "normalised match", "contains": "contains",
          "json_valid": "JSON valid", "json_schema": "JSON schema valid"}
SHORT = {"exact_match": "exact", "normalized_match": "norm.", "contains": "contains", "json_valid": "JSON",
         "json_schema": "schema"}
_WORDS = re.compile(r"\s+|\w+|[^\w\s]")
_DIFF_LIMIT = 3000  # tokens per side; longer answers are shown without highlighting


def document(report: dict[str, Any], title: str = "lorakit evaluation report") -> str:
    """The whole report as one HTML page with its stylesheet inline and nothing to fetch."""
    css = CSS_FILE.read_text(encoding="utf-8")
    return (
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        "img-src data:\">\n"
        f"<title>{escape(title)}</title>\n<style>\n{css}</style>\n</head>\n"
        f"<body class=\"lk-standalone\">\n<h1 class=\"lk-title\">{escape(title)}</h1>\n{fragment(report)}\n"
        "<footer class=\"lk-footer\">written by <code>lorakit eval</code></footer>\n</body>\n</html>\n")


def fragment(report: dict[str, Any]) -> str:
    """The report's body: summary, measures table, chart, lm-eval scores and examples (for a page
    that links report.css). A report of lm-eval tasks alone (no data file) has only their table."""
    parts = ["<section class=\"lk-report\">"]
    if report.get("data") is not None:
        parts += [_summary(report), "<h2>Measures</h2>", measures_table(report), "<h2>Chart</h2>", chart_svg(report)]
    if report.get("lm_eval"):
        run = report["lm_eval"]
        parts += [f"<h2>lm-evaluation-harness <span class=\"lk-count\">lm-eval {escape(str(run['lm_eval_version']))}"
                  f", {escape(', '.join(run['tasks']))}</span></h2>", tasks_table(report)]
    if report["examples"]:
        parts += [f"<h2>Answers <span class=\"lk-count\">{len(report['examples'])} examples</span></h2>",
                  examples_table(report)]
    parts.append("</section>")
    return "\n".join(parts)


def measures(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """``(key, label, lower_is_better)`` for each row of the measures table, in order."""
    rows = [("loss", LABELS["loss"], True), ("perplexity", LABELS["perplexity"], True)]
    rows += [(name, LABELS.get(name, name), False) for name in report["metrics"]]
    if report["models"] and "general_loss" in report["models"][0]:
        rows.append(("general_loss", LABELS["general_loss"], True))
    return rows


def value_of(model: dict[str, Any], key: str) -> float | None:
    """A model's value for a measure key of :func:`measures`."""
    value = model.get(key) if key in ("loss", "perplexity", "general_loss") else model["metrics"].get(key)
    return None if value is None else float(value)


def format_value(key: str, value: float | None) -> str:
    """The visible text of a measure's value."""
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞"
    if key in ("loss", "general_loss"):
        return f"{value:.4f}"
    if key == "perplexity":
        return f"{value:.2f}"
    return f"{value * 100:.1f} %"


def _change(key: str, value: float | None, base: float | None, lower_better: bool) -> str:
    if value is None or base is None or not math.isfinite(value) or not math.isfinite(base):
        return ""
    delta = value - base
    if key in ("loss", "general_loss"):
        text = f"{delta:+.4f}"
        if key == "general_loss" and base:
            text += f" ({delta / base:+.1%})"
    elif key == "perplexity":
        text = f"{delta:+.2f}"
    else:
        text = f"{delta * 100:+.1f} pts"
    better = delta < 0 if lower_better else delta > 0
    tone = "lk-same" if delta == 0 else ("lk-better" if better else "lk-worse")
    return f"<span class=\"lk-delta {tone}\">{text}</span>"


def _summary(report: dict[str, Any]) -> str:
    settings = report.get("settings", {})
    facts = [f"<b>{escape(str(report['data']))}</b>", f"{report['rows']} rows",
             f"{report['answer_tokens']:,} answer tokens"]
    if report["examples_generated"]:
        facts.append(f"{report['examples_generated']} answers per model ({escape(str(settings.get('decoding')))}, "
                     f"at most {settings.get('max_new_tokens')} new tokens)")
    if report.get("general"):
        facts.append(f"forgetting check on {escape(Path(report['general']).name)} "
                     f"({report.get('general_tokens') or 0:,} tokens)")
    if report.get("seconds") is not None:
        facts.append(f"{report['seconds']} s")
    return "<p class=\"lk-summary\">" + " · ".join(facts) + "</p>"


def _model_head(model: dict[str, Any], index: int) -> str:
    role = "base" if index == 0 else "adapter"
    title = f" title=\"{escape(str(model['adapter']))}\"" if model.get("adapter") else ""
    return (f"<th class=\"lk-model\" data-model=\"{escape(model['name'])}\"{title}>"
            f"<span class=\"lk-dot lk-c{index % len(COLORS)}\"></span>{escape(model['name'])}"
            f"<span class=\"lk-role\">{role}</span></th>")


def measures_table(report: dict[str, Any]) -> str:
    """The measures × models table (``td`` cells carry ``data-model``, ``data-measure``, ``data-value``)."""
    models = report["models"]
    head = "".join(_model_head(m, i) for i, m in enumerate(models))
    lines = ["<table class=\"lk-measures\">", f"<thead><tr><th>measure</th>{head}</tr></thead>", "<tbody>"]
    for key, label, lower_better in measures(report):
        values = [value_of(m, key) for m in models]
        finite = [v for v in values if v is not None and math.isfinite(v)]
        best = (min(finite) if lower_better else max(finite)) if len(finite) > 1 else None
        cells = []
        for i, (model, value) in enumerate(zip(models, values)):
            mark = " lk-best" if best is not None and value == best and len(set(finite)) > 1 else ""
            change = "" if i == 0 else _change(key, value, values[0], lower_better)
            data = "" if value is None else f" data-value=\"{value!r}\""
            cells.append(f"<td class=\"lk-num{mark}\" data-model=\"{escape(model['name'])}\" data-measure=\"{key}\""
                         f"{data}><span class=\"lk-value\">{format_value(key, value)}</span>{change}</td>")
        arrow = "↓" if lower_better else "↑"
        lines.append(f"<tr><th scope=\"row\">{escape(label)} <span class=\"lk-arrow\">{arrow}</span></th>"
                     f"{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def tasks_table(report: dict[str, Any]) -> str:
    """lm-eval's scores (``lorakit eval --tasks``): one row per task and metric, one column per model,
    each value with its change from the base (``td`` cells carry ``data-task``, ``data-metric``,
    ``data-model``, ``data-value``)."""
    models = report["models"]
    head = "".join(_model_head(m, i) for i, m in enumerate(models))
    lines = ["<table class=\"lk-measures lk-tasks\">", f"<thead><tr><th>task</th><th>metric</th>{head}</tr></thead>",
             "<tbody>"]
    for task, metrics in report["lm_eval"]["results"].items():
        for metric, entry in metrics.items():
            higher = entry["higher_is_better"]
            values = [entry["values"].get(m["name"]) for m in models]
            cells = []
            for i, (model, value) in enumerate(zip(models, values)):
                change = ""
                if i and value is not None and values[0] is not None:
                    delta = value - values[0]
                    tone = "lk-same" if delta == 0 or higher is None else (
                        "lk-better" if (delta > 0) == higher else "lk-worse")
                    change = f"<span class=\"lk-delta {tone}\">{delta:+.4f}</span>"
                text = "–" if value is None else f"{value:.4f}"
                data = "" if value is None else f" data-value=\"{value!r}\""
                cells.append(f"<td class=\"lk-num\" data-task=\"{escape(task)}\" data-metric=\"{escape(metric)}\" "
                             f"data-model=\"{escape(model['name'])}\"{data}><span class=\"lk-value\">{text}</span>"
                             f"{change}</td>")
            arrow = {True: "↑", False: "↓"}.get(higher, "")
            lines.append(f"<tr><th scope=\"row\">{escape(task)}</th><th scope=\"row\">{escape(metric)} "
                         f"<span class=\"lk-arrow\">{arrow}</span></th>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


# -- chart ---------------------------------------------------------------------------------------


def chart_svg(report: dict[str, Any]) -> str:
    """Grouped bars as inline SVG: losses on the left, generation metrics (0–100 %) on the right."""
    models = report["models"]
    losses = [(k, label) for k, label, _ in measures(report) if k in ("loss", "general_loss")]
    metrics = [(k, LABELS.get(k, k)) for k in report["metrics"]]
    panels = [("loss (lower is better)", losses, None)] + ([("generation metrics (higher is better)", metrics, 1.0)]
                                                           if metrics else [])
    width, height, gap = 880, 300, 40
    panel_w = (width - gap * (len(panels) - 1)) / len(panels)
    out = [f"<svg class=\"lk-chart\" viewBox=\"0 0 {width} {height + 34}\" role=\"img\" "
           "xmlns=\"http://www.w3.org/2000/svg\" aria-label=\"losses and generation metrics per model\">"]
    x = 0.0
    for title, groups, top in panels:
        out.append(_panel(models, groups, top, x, panel_w, height, title))
        x += panel_w + gap
    legend_x = 0.0
    for i, m in enumerate(models):
        color = COLORS[i % len(COLORS)]
        out.append(f"<rect x=\"{legend_x:.1f}\" y=\"{height + 18}\" width=\"12\" height=\"12\" rx=\"2\" fill=\"{color}\"/>"
                   f"<text x=\"{legend_x + 17:.1f}\" y=\"{height + 28}\" class=\"lk-legend\">{escape(m['name'])}</text>")
        legend_x += 30 + 7.5 * len(m["name"])
    out.append("</svg>")
    return "".join(out)


def _panel(models: list[dict], groups: list[tuple[str, str]], top: float | None, x0: float, w: float, h: float,
           title: str) -> str:
    plot_top, plot_bottom, left = 34.0, h - 30.0, 38.0
    values = [[value_of(m, key) for m in models] for key, _ in groups]
    finite = [v for row in values for v in row if v is not None and math.isfinite(v)]
    scale = top if top is not None else _nice_ceiling(max(finite, default=1.0) * 1.1)
    out = [f"<g transform=\"translate({x0:.1f},0)\"><text x=\"0\" y=\"16\" class=\"lk-chart-title\">{escape(title)}</text>"]
    for t in range(5):  # gridlines and their labels
        v = scale * t / 4
        y = plot_bottom - (plot_bottom - plot_top) * t / 4
        label = f"{v * 100:.0f}%" if top is not None else f"{v:.3g}"
        out.append(f"<line x1=\"{left}\" x2=\"{w:.1f}\" y1=\"{y:.1f}\" y2=\"{y:.1f}\" class=\"lk-grid\"/>"
                   f"<text x=\"{left - 6}\" y=\"{y + 4:.1f}\" class=\"lk-axis\" text-anchor=\"end\">{label}</text>")
    group_w = (w - left) / max(1, len(groups))
    bar_w = min(44.0, group_w * 0.8 / max(1, len(models)))
    for g, ((key, label), row) in enumerate(zip(groups, values)):
        center = left + group_w * (g + 0.5)
        for j, value in enumerate(row):
            bx = center + (j - len(models) / 2) * bar_w
            if value is None or not math.isfinite(value):
                continue
            bh = (plot_bottom - plot_top) * min(value, scale) / scale
            color = COLORS[j % len(COLORS)]
            out.append(f"<rect x=\"{bx + 1:.1f}\" y=\"{plot_bottom - bh:.1f}\" width=\"{bar_w - 2:.1f}\" "
                       f"height=\"{bh:.1f}\" rx=\"2\" fill=\"{color}\"><title>{escape(models[j]['name'])}: "
                       f"{escape(label)} {format_value(key, value)}</title></rect>")
            if bar_w >= 24:  # room for a label above the bar
                short = f"{value * 100:.0f}%" if top is not None else f"{value:.2f}"
                out.append(f"<text x=\"{bx + bar_w / 2:.1f}\" y=\"{plot_bottom - bh - 4:.1f}\" "
                           f"class=\"lk-bar-label\" text-anchor=\"middle\">{short}</text>")
        out.append(f"<text x=\"{center:.1f}\" y=\"{plot_bottom + 18:.1f}\" class=\"lk-axis\" text-anchor=\"middle\">"
                   f"{escape(label)}</text>")
    out.append("</g>")
    return "".join(out)


def _nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= value)


# -- examples ------------------------------------------------------------------------------------


def examples_table(report: dict[str, Any]) -> str:
    """Per example: prompt, reference, each model's answer (``td.lk-answer``) with its differences marked."""
    models = [m["name"] for m in report["models"]]
    head = "".join(_model_head(m, i) for i, m in enumerate(report["models"]))
    lines = ["<label class=\"lk-filter\"><input type=\"checkbox\" class=\"lk-only-differ\"> only examples on which "
             "the models disagree</label>",
             "<div class=\"lk-scroll\"><table class=\"lk-examples\">",
             f"<thead><tr><th>#</th><th>prompt</th><th>reference</th>{head}</tr></thead>", "<tbody>"]
    for i, ex in enumerate(report["examples"], 1):
        outputs = [ex["outputs"][name] for name in models]
        kind = "lk-same" if len(set(outputs)) == 1 else "lk-differ"
        cells = [f"<td class=\"lk-index\" title=\"{escape(ex['where'])}\">{i}</td>",
                 f"<td class=\"lk-text lk-prompt\">{escape(ex['prompt'])}</td>",
                 f"<td class=\"lk-text lk-reference\">{escape(ex['reference'])}</td>"]
        for name, output in zip(models, outputs):
            scores = ex["scores"].get(name, {})
            exact = scores.get("exact_match") == 1.0
            cells.append(f"<td class=\"lk-text lk-answer{' lk-exact' if exact else ''}\" data-model=\"{escape(name)}\">"
                         f"<div class=\"lk-answer-text\">{highlight(output, ex['reference'])}</div>{_chips(scores)}</td>")
        lines.append(f"<tr class=\"lk-example {kind}\">{''.join(cells)}</tr>")
    lines.append("</tbody></table></div>")
    return "\n".join(lines)


def _chips(scores: dict[str, float]) -> str:
    chips = []
    for name, value in scores.items():
        label = SHORT.get(name, name)
        tone = "lk-pass" if value >= 1 else ("lk-fail" if value <= 0 else "lk-part")
        shown = label if value in (0.0, 1.0) else f"{label} {value:.2f}"
        chips.append(f"<span class=\"lk-chip {tone}\" title=\"{escape(LABELS.get(name, name))}: {value:g}\">"
                     f"{escape(shown)}</span>")
    return f"<div class=\"lk-chips\">{''.join(chips)}</div>" if chips else ""


def highlight(answer: str, reference: str) -> str:
    """``answer`` escaped, with the words that are not in ``reference`` (a word-level diff) in ``<mark>``."""
    if not answer:
        return "<span class=\"lk-empty\">(empty)</span>"
    ours, theirs = _WORDS.findall(answer), _WORDS.findall(reference)
    if len(ours) > _DIFF_LIMIT or len(theirs) > _DIFF_LIMIT:
        return escape(answer)
    out = []
    matcher = difflib.SequenceMatcher(None, theirs, ours, autojunk=False)
    for op, _, _, j1, j2 in matcher.get_opcodes():
        text = escape("".join(ours[j1:j2]))
        if op == "equal" or not text.strip():
            out.append(text)
        elif text:
            out.append(f"<mark>{text}</mark>")
    return "".join(out)
