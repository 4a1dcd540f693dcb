"""What a person sees, in headless Chromium (tests/browser.py): the page ``lorakit serve`` serves, and
the ``report.html`` that ``lorakit eval`` writes.

The server is ``lorakit serve``'s own app (``commands.serve.build_app`` from the CLI's arguments:
a tiny Llama with SmolLM2's tokenizer and chat template, adapters alpha and beta, an API key, a data
root) on a free loopback port. Every test saves screenshots to the run's ``artifacts`` folder.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from serve.page_helpers import BASE, BUDGET, KEY, MODELS, serve_args

from lorakit.commands.serve import build_app
from lorakit.evaluate.html import format_value, measures
from lorakit.serve.asgi import BackgroundServer
from lorakit.serve.sampling import SamplingParams

PROMPT = 'Define the word "lantern".'
ALL_DONE = "return [...document.querySelectorAll('.answer-card')].length === 3 && " \
           "[...document.querySelectorAll('.answer-card')].every(c => c.dataset.state === 'done')"


@pytest.fixture(scope="module")
def served(browser, page_world):
    app = build_app(serve_args(page_world))
    with BackgroundServer(app) as running:
        yield {"url": running.url, "engine": app.state.server.engine, "world": page_world, "browser": browser}


def open_page(served, key=KEY):
    """Load the page in a fresh tab state, with ``key`` in the tab's storage (None: no key)."""
    browser = served["browser"]
    browser.console()
    browser.log.clear()  # each test counts its own console errors
    browser.get(served["url"] + "/ui/favicon.svg")  # same origin: set the storage before the page loads
    browser.js("sessionStorage.clear(); if (arguments[0]) sessionStorage.setItem('lorakit.apiKey', arguments[0]);", key)
    browser.get(served["url"] + "/")
    if key == KEY:
        browser.wait("return document.querySelectorAll('#model-list li').length === 3", what="the model list")
    return browser


def send(browser, prompt, max_tokens):
    browser.type("#max-tokens", str(max_tokens))
    browser.type("#prompt", prompt)
    browser.click("#send")


def answers(browser):
    return browser.js("const out = {}; for (const c of document.querySelectorAll('.answer-card')) {"
                      "  const t = c.querySelectorAll('.turn.assistant .text');"
                      "  out[c.dataset.model] = {text: t.length ? t[t.length - 1].textContent : '', state: c.dataset.state,"
                      "    finish: c.dataset.finish, tokens: c.dataset.tokens, foot: c.querySelector('.answer-foot').textContent};"
                      "} return out;")


def greedy(served, model, messages, max_tokens):
    adapter = None if model == BASE else model
    return served["engine"].submit(messages=messages, adapter=adapter,
                                   params=SamplingParams(max_tokens=max_tokens, temperature=0)).result()


def test_the_page_loads_without_console_errors(served):
    browser = open_page(served)
    names = browser.js("return [...document.querySelectorAll('#model-list .name')].map(e => e.textContent)")
    assert names == MODELS
    assert browser.text("#status-text") == f"{BASE} · 2 adapters"
    browser.screenshot("page-loaded")
    browser.click("#tab-compare")
    browser.wait("return document.querySelectorAll('#server-file option').length >= 2", what="the data files")
    browser.click("#tab-play")
    assert browser.errors() == []


def test_base_and_two_adapters_answer_as_the_engines_greedy_output(served):
    browser = open_page(served)
    shapes = []
    hook = served["engine"].model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        send(browser, PROMPT, 24)
        browser.wait(ALL_DONE, what="three finished answers")
    finally:
        hook.remove()
    assert (3, 1) in shapes  # the three requests were decoded together, one batch row each
    shown = answers(browser)
    browser.screenshot("three-answers")
    messages = [{"role": "user", "content": PROMPT}]
    for model in MODELS:
        want = greedy(served, model, messages, 24)
        assert shown[model]["text"] == want.text
        assert shown[model]["finish"] == want.finish_reason and shown[model]["tokens"] == str(want.completion_tokens)
        assert f"{want.completion_tokens} tokens" in shown[model]["foot"] and "tok/s" in shown[model]["foot"]
    assert len({shown[m]["text"] for m in MODELS}) == 3  # each adapter changes the answer
    # A second turn: each model continues its own conversation, as the chat endpoint does.
    send(browser, "And in one word?", 6)
    browser.wait(ALL_DONE, what="the second answers")
    second = answers(browser)
    for model in MODELS:
        history = messages + [{"role": "assistant", "content": shown[model]["text"]},
                              {"role": "user", "content": "And in one word?"}]
        assert second[model]["text"] == greedy(served, model, history, 6).text
    assert browser.errors() == []


def test_completion_mode_sends_the_prompt_as_it_is(served):
    browser = open_page(served)
    browser.click("#mode button[data-mode=text]")
    assert browser.js("return document.getElementById('system-field').hidden")
    send(browser, "The lantern", 10)
    browser.wait(ALL_DONE, what="three completions")
    shown = answers(browser)
    for model in MODELS:
        want = served["engine"].submit(prompt="The lantern", adapter=None if model == BASE else model,
                                       params=SamplingParams(max_tokens=10, temperature=0)).result()
        assert shown[model]["text"] == want.text and shown[model]["finish"] == want.finish_reason
    assert browser.errors() == []


def test_streaming_fills_the_answers_visibly(served):
    browser = open_page(served)
    engine = served["engine"]
    slow = engine.model.register_forward_hook(lambda *args: time.sleep(0.04))  # one engine step ≥ 40 ms
    try:
        send(browser, "Tell me a long story about a lantern.", 120)
        lengths = "return [...document.querySelectorAll('.answer-card')].map(c => " \
                  "[c.dataset.state, (c.querySelector('.turn.assistant .text') || {textContent: ''}).textContent.length])"
        browser.wait(f"const s = (() => {{ {lengths} }})(); return s.length === 3 && s.every(([st, n]) => n >= 8)",
                     what="some text in every answer")
        first = browser.js(lengths)
        shot1 = browser.screenshot("streaming-1")
        time.sleep(1.0)
        second = browser.js(lengths)
        shot2 = browser.screenshot("streaming-2")
        browser.wait(ALL_DONE, timeout=120, what="the stories to finish")
    finally:
        slow.remove()
    assert all(state == "streaming" for state, _ in first)
    assert all(n2 > n1 for (_, n1), (_, n2) in zip(first, second)), (first, second)
    assert shot1.read_bytes() != shot2.read_bytes()
    final = answers(browser)
    for model, (_, n1) in zip(MODELS, first):
        assert len(final[model]["text"]) > n1 and final[model]["finish"] == "length"
    assert browser.errors() == []


def test_a_wrong_api_key_shows_the_servers_401_message(served):
    server_says = {}
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        answer = httpx.get(served["url"] + "/v1/models", headers=headers, timeout=30)
        assert answer.status_code == 401
        server_says[key] = answer.json()["error"]["message"]
    browser = open_page(served, key=None)
    browser.wait("return document.getElementById('key-dialog').open", what="the key dialog")
    assert browser.text("#key-message") == server_says[None]
    browser.type("#key-input", "sk-wrong")
    browser.click("#key-save")
    browser.wait("return document.getElementById('key-dialog').open && "
                 "document.getElementById('key-message').textContent === arguments[0]", server_says["sk-wrong"],
                 what="the 401 message for a wrong key")
    assert browser.text("#status-text") == "API key needed"
    browser.screenshot("wrong-api-key")
    browser.type("#key-input", KEY)
    browser.click("#key-save")
    browser.wait("return document.querySelectorAll('#model-list li').length === 3", what="the models, with the key")
    assert not browser.js("return document.getElementById('key-dialog').open")
    assert browser.js("return sessionStorage.getItem('lorakit.apiKey')") == KEY
    assert browser.js("return localStorage.length") == 0 and "sk-" not in browser.js("return document.cookie")
    # The browser's own log has the two refused requests and nothing else.
    errors = browser.errors()
    assert errors and all("401" in e and "/v1/" in e for e in errors), errors


def test_an_adapter_loaded_at_run_time_appears_after_refresh(served):
    browser = open_page(served)
    folder = served["world"]["adapters"]["alpha"]
    body = {"lora_name": "gamma", "lora_path": str(folder)}
    headers = {"Authorization": f"Bearer {KEY}"}
    assert httpx.post(served["url"] + "/v1/load_lora_adapter", json=body, headers=headers).status_code == 200
    try:
        browser.click("#refresh-models")
        browser.wait("return [...document.querySelectorAll('#model-list .name')].some(e => e.textContent === 'gamma')",
                     what="gamma in the list")
        assert not browser.js("return document.querySelector('#model-list input[value=gamma]').checked")
        browser.click("#model-list input[value=gamma]")  # a new adapter is offered, not chosen for you
        assert browser.js("return document.querySelector('.answer-card[data-model=gamma]') !== null")
    finally:
        httpx.post(served["url"] + "/v1/unload_lora_adapter", json={"lora_name": "gamma"}, headers=headers)
    browser.click("#refresh-models")
    browser.wait("return document.querySelectorAll('#model-list li').length === 3", what="gamma gone")
    assert browser.errors() == []


def test_the_compare_view_on_a_10_row_file_shows_lorakit_evals_metrics(served):
    oracle = served["world"]["oracle"]
    browser = open_page(served)
    browser.click("#tab-compare")
    browser.wait("return document.querySelectorAll('#server-file option').length >= 2", what="the data files")
    browser.upload("#upload", served["world"]["ten"])
    browser.type("#limit", "10")
    browser.type("#compare-max-tokens", str(BUDGET))
    browser.click("#run-compare")
    browser.wait("return document.querySelector('#compare-result .lk-report') || "
                 "document.getElementById('compare-error').textContent", timeout=300, what="the report")
    assert browser.text("#compare-error") == ""
    rows = browser.js("return [...document.querySelectorAll('#compare-result tr.lk-example')].map(r => "
                      "[...r.querySelectorAll('td.lk-answer')].map(c => [c.dataset.model, "
                      "c.querySelector('.lk-answer-text').textContent]))")
    assert len(rows) == 10 and all([m for m, _ in row] == MODELS for row in rows)
    by_name = dict(zip(MODELS, ["base", "alpha", "beta"]))
    for i, row in enumerate(rows):
        for model, text in row:
            assert text == (oracle["answers"][by_name[model]][i] or "(empty)")
    cells = browser.js("const out = {}; for (const td of document.querySelectorAll('#compare-result td[data-measure]'))"
                       " out[td.dataset.model + '/' + td.dataset.measure] = [td.dataset.value, "
                       "td.querySelector('.lk-value').textContent]; return out;")
    report = oracle["report"]
    keys = [key for key, _, _ in measures(report)]
    assert keys == ["loss", "perplexity", "exact_match", "normalized_match", "contains", "json_valid"]
    for name, want in zip(MODELS, report["models"]):
        for key in keys:
            value = want[key] if key in ("loss", "perplexity") else want["metrics"][key]
            shown, text = cells[f"{name}/{key}"]
            assert text == format_value(key, value), (name, key)
            if key in ("loss", "perplexity"):
                assert float(shown) == pytest.approx(value, rel=1e-5)
            else:
                assert float(shown) == value
    browser.js("document.getElementById('compare-result').scrollIntoView()")
    browser.screenshot("compare-view")
    browser.js("document.querySelector('#compare-result .lk-examples').scrollIntoView()")
    browser.screenshot("compare-view-answers")
    assert browser.errors() == []


def test_report_html_opens_offline_and_shows_the_json_reports_values(served):
    """``lorakit eval``'s report.html (written by the same run as report.json), from a file:// URL."""
    oracle = served["world"]["oracle"]
    browser = served["browser"]
    browser.console()
    browser.log.clear()
    page = oracle["out"] / "report.html"
    browser.get(page.as_uri())
    browser.wait("return document.readyState === 'complete'")
    report = json.loads((oracle["out"] / "report.json").read_text())
    cells = browser.js("const out = {}; for (const td of document.querySelectorAll('td[data-measure]'))"
                       " out[td.dataset.model + '/' + td.dataset.measure] = td.querySelector('.lk-value').textContent;"
                       " return out;")
    checked = 0
    for model in report["models"]:
        for key, _, _ in measures(report):
            value = model[key] if key in ("loss", "perplexity") else model["metrics"][key]
            assert cells[f"{model['name']}/{key}"] == format_value(key, value)
            checked += 1
    assert checked == 3 * 6
    assert browser.js("return document.querySelectorAll('tr.lk-example').length") == 10
    assert browser.js("return document.querySelectorAll('svg.lk-chart rect').length") >= 3 * 6
    assert browser.js("return performance.getEntriesByType('resource').length") == 0  # nothing fetched
    browser.screenshot("report-html", full=True)
    assert browser.errors() == []
