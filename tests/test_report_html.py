"""report.html (lorakit.evaluate.html) without a browser: self-contained, escaped, every value shown;
the browser test is tests/serve/test_page_browser.py::test_report_html_opens_offline_and_shows_the_json_reports_values."""

from __future__ import annotations

import re

from lorakit.evaluate import html
from lorakit.evaluate.report import write_reports

EVIL = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def report():
    def model(name, loss, exact, **extra):
        return {"name": name, "adapter": f"runs/{name}" if name != "base" else None, "loss": loss,
                "perplexity": 2.718281828 ** loss, "tokens": 40, "rows": 2,
                "metrics": {"exact_match": exact, "json_valid": 1.0}, **extra}

    return {
        "data": "data/eval.jsonl", "general": None, "rows": 2, "examples_generated": 2, "answer_tokens": 40,
        "general_tokens": None, "metrics": ["exact_match", "json_valid"],
        "models": [model("base", 1.234567, 0.5), model("json", 0.987654, 1.0, loss_delta=-0.246913)],
        "examples": [
            {"where": "data/eval.jsonl line 1", "line": 1, "prompt": "Define " + EVIL, "reference": '{"a": 1}',
             "outputs": {"base": '{"a": 2}', "json": '{"a": 1}'},
             "scores": {"base": {"exact_match": 0.0, "json_valid": 1.0}, "json": {"exact_match": 1.0, "json_valid": 1.0}}},
            {"where": "data/eval.jsonl line 2", "line": 2, "prompt": "b", "reference": "yes",
             "outputs": {"base": "yes", "json": "yes"},
             "scores": {"base": {"exact_match": 1.0, "json_valid": 1.0}, "json": {"exact_match": 1.0, "json_valid": 1.0}}},
        ],
        "settings": {"batch_size": 8, "max_length": 1024, "limit": None, "max_new_tokens": 16, "decoding": "greedy"},
        "seconds": 1.5,
    }


def test_the_page_is_self_contained_and_escapes_what_it_shows():
    page = html.document(report())
    assert "<script" not in page and "<img" not in page
    assert html.escape(EVIL) in page
    assert not re.search(r"<[a-z][^<>]*\s(src|href)=", page)  # no tag loads anything
    assert "default-src 'none'" in page and "<style>" in page and "lk-measures" in page
    assert not re.search(r"\sstyle=", page)  # colours are classes: no inline style attributes


def test_every_value_is_shown_with_its_change_and_the_best_marked():
    page = html.fragment(report())
    cell = re.compile(r'<td class="lk-num( lk-best)?" data-model="(\w+)" data-measure="(\w+)" data-value="([^"]+)">'
                      r'<span class="lk-value">([^<]+)</span>')
    found = {(m, k): (float(v), text, bool(best)) for best, m, k, v, text in cell.findall(page)}
    assert found[("base", "loss")] == (1.234567, "1.2346", False)
    assert found[("json", "loss")] == (0.987654, "0.9877", True)
    assert found[("base", "exact_match")] == (0.5, "50.0 %", False) and found[("json", "exact_match")][1:] == ("100.0 %", True)
    assert found[("json", "json_valid")] == (1.0, "100.0 %", False)  # a tie is nobody's best
    assert len(found) == 2 * 4
    assert '<span class="lk-delta lk-better">-0.2469</span>' in page and "+50.0 pts" in page
    # The examples: the differing words marked, exact answers tinted, the agreeing row classed for the filter.
    assert '<tr class="lk-example lk-differ">' in page and '<tr class="lk-example lk-same">' in page
    assert "{&quot;a&quot;: <mark>2</mark>}" in page
    assert page.count("lk-answer lk-exact") == 3
    assert page.count("<rect") >= 2 * 3  # bars: 1 loss + 2 metrics per model (and the legend)


def test_highlight_marks_only_what_differs_from_the_reference():
    assert html.highlight("the cat sat", "the cat sat") == "the cat sat"
    assert html.highlight("the dog sat", "the cat sat") == "the <mark>dog</mark> sat"
    assert html.highlight("", "x") == '<span class="lk-empty">(empty)</span>'
    assert html.highlight("<b>", "") == "<mark>&lt;b&gt;</mark>"


def test_write_reports_writes_report_html(tmp_path):
    written = write_reports(report(), tmp_path)
    assert tmp_path / "report.html" in written
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "data/eval.jsonl" in page and "1.2346" in page


def test_the_css_names_the_chart_colours_in_order():
    css = html.CSS_FILE.read_text()
    assert [css.index(f".lk-c{i} {{ background: {c}; }}") for i, c in enumerate(html.COLORS)] == sorted(
        css.index(f".lk-c{i} {{ background: {c}; }}") for i, c in enumerate(html.COLORS))
