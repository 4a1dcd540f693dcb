"""The page's routes over HTTP (no browser): the page and its files, the data-file listing and its
path checks, and the compare endpoint, whose numbers and answers equal ``lorakit eval``'s on the same
file. The server is ``lorakit serve``'s own app (``commands.serve.build_app``) on a loopback port."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from serve.page_helpers import BASE, BUDGET, KEY, MODELS, serve_args

from lorakit.commands.serve import build_app
from lorakit.serve.asgi import BackgroundServer
from lorakit.serve.page import ASSETS


@pytest.fixture(scope="module")
def server(page_world):
    app = build_app(serve_args(page_world, "--max-body-bytes", "65536"))
    with BackgroundServer(app) as running:
        yield {"url": running.url, "engine": app.state.server.engine, "world": page_world}


def get(server, path, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(server["url"] + path, headers=headers, timeout=60)


def compare(server, body, key=KEY, timeout=300):
    """POST /v1/lorakit/compare; (status, the SSE payloads or the error body)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", server["url"] + "/v1/lorakit/compare", json=body, headers=headers,
                      timeout=timeout) as response:
        if response.status_code != 200:
            return response.status_code, json.loads(response.read())
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return 200, [json.loads(e) for e in events[:-1]]


def ten(**extra):
    return {"models": MODELS, "file": {"root": "data", "path": "ten.jsonl"}, "max_new_tokens": BUDGET, **extra}


# -- the page and its files -----------------------------------------------------------------------------

def test_the_page_and_its_files_need_no_key_and_carry_a_strict_csp(server):
    page = get(server, "/", key=None)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
    for name in ASSETS:  # linked relative to the page
        assert f'"ui/{name}"' in page.text
    for name, (path, media) in ASSETS.items():
        asset = get(server, f"/ui/{name}", key=None)
        assert asset.status_code == 200 and asset.headers["content-type"] == media and asset.content == path.read_bytes()
    missing = get(server, "/ui/secrets.txt", key=None)
    assert missing.status_code == 404 and "no such file" in missing.json()["error"]["message"]
    assert get(server, "/ui/..%2Fhttp.py", key=None).status_code == 404
    # The page's data endpoints are API routes: the key, and the server's own 401 message.
    no_key = get(server, "/v1/lorakit/data_files", key=None)
    assert no_key.status_code == 401 and no_key.json() == get(server, "/v1/models", key=None).json()
    assert get(server, "/v1/lorakit/data_files", key="wrong").status_code == 401


def test_the_page_fetches_nothing_from_elsewhere():
    """No CDN, no web font, no remote script: the only URL in the page's files is SVG's namespace."""
    import re

    from lorakit.serve.page import STATIC

    for path in [STATIC / "index.html", *(path for path, _ in ASSETS.values())]:
        text = path.read_text()
        assert not re.findall(r"https?://(?!www\.w3\.org/2000/svg)", text), path.name
        assert "@import" not in text and "url(" not in text, path.name


def test_data_files_lists_data_under_the_roots_only(server, tmp_path):
    world = server["world"]
    outside = tmp_path / "secret.jsonl"
    outside.write_text('{"text": "not yours"}\n')
    link = world["data"] / "link.jsonl"
    link.symlink_to(outside)
    hidden = world["data"] / ".hidden.jsonl"
    hidden.write_text('{"text": "x"}\n')
    extra = world["root"] / "adapters" / "held_out.jsonl"
    extra.write_text((world["ten"]).read_text())
    try:
        body = get(server, "/v1/lorakit/data_files").json()
    finally:
        link.unlink(), hidden.unlink(), extra.unlink()
    listed = {(f["root"], f["path"]) for f in body["data"]}
    assert {("data", "ten.jsonl"), ("data", "draft.jsonl"), ("adapter", "held_out.jsonl")} <= listed
    assert ("data", "link.jsonl") not in listed and ("data", ".hidden.jsonl") not in listed
    assert not any(path.endswith(("adapter_config.json", "adapter_model.safetensors")) for _, path in listed)
    assert body["roots"] == ["data", "adapter"] and body["max_upload_bytes"] == 65536
    assert next(f for f in body["data"] if f["path"] == "ten.jsonl")["bytes"] == world["ten"].stat().st_size


# -- compare: the numbers of lorakit eval ---------------------------------------------------------------

def test_compare_equals_lorakit_eval_on_the_same_file(server):
    oracle = server["world"]["oracle"]
    status, events = compare(server, ten())
    assert status == 200, events
    progress = [e for e in events if e["object"] == "lorakit.compare.progress"]
    total = 3 * (10 + 10)  # 10 answers and 10 rows' loss per model
    assert progress[0]["done"] == 0 and progress[-1] == {"object": "lorakit.compare.progress", "done": total,
                                                         "total": total}
    assert [p["done"] for p in progress] == sorted(p["done"] for p in progress)
    final = events[-1]
    assert final["object"] == "lorakit.compare.report"
    assert_same_as_eval(final["report"], oracle)
    assert final["html"].count('<tr class="lk-example') == 10 and final["html"].count('class="lk-text lk-answer') == 30
    # The same file uploaded gives the same report.
    upload = {"name": "ten.jsonl", "content": server["world"]["ten"].read_text()}
    status, events = compare(server, {**ten(), "file": None, "upload": upload})
    assert status == 200, events
    assert_same_as_eval(events[-1]["report"], oracle)
    assert events[-1]["report"]["data"] == "ten.jsonl (uploaded)"
    assert server["engine"].stats()["running"] == server["engine"].stats()["waiting"] == 0


def assert_same_as_eval(report, oracle):
    want = oracle["report"]
    assert [m["name"] for m in report["models"]] == MODELS
    assert report["rows"] == want["rows"] == 10 and report["examples_generated"] == 10
    assert report["answer_tokens"] == want["answer_tokens"]
    assert report["metrics"] == want["metrics"] == ["exact_match", "normalized_match", "contains", "json_valid"]
    for got, expected in zip(report["models"], want["models"]):
        assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
        assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-4)
        assert got["tokens"] == expected["tokens"] and got["metrics"] == expected["metrics"]
    by_name = dict(zip(MODELS, ["base", "alpha", "beta"]))
    for i, example in enumerate(report["examples"]):
        for name in MODELS:
            assert example["outputs"][name] == oracle["answers"][by_name[name]][i]
    exact = [m["metrics"]["exact_match"] for m in report["models"]]
    assert exact[0] >= 0.2 and exact[1] >= 0.2 and exact[2] >= 0.1 and max(exact) < 1  # not vacuous


# -- compare: what it refuses ---------------------------------------------------------------------------

def test_compare_reads_only_data_files_under_the_roots(server, tmp_path):
    world = server["world"]
    outside = tmp_path / "outside.jsonl"
    outside.write_text(world["ten"].read_text())
    link = world["data"] / "escape.jsonl"
    link.symlink_to(outside)
    (world["data"] / "notes.txt").write_text("hello")
    cases = [
        ({"root": "data", "path": "../adapters/alpha/adapter_config.json"}, 403, "without '..'"),
        ({"root": "data", "path": str(outside)}, 403, "relative to its root"),
        ({"root": "data", "path": "escape.jsonl"}, 403, "leads outside the data root"),
        ({"root": "etc", "path": "passwd"}, 400, "not a data root of this server (roots: data, adapter)"),
        ({"root": "data", "path": "notes.txt"}, 400, "is not a data file"),
        ({"root": "data", "path": "nothing.jsonl"}, 404, "no such file under the data root"),
        ({"root": "adapter", "path": "alpha/adapter_config.json"}, 400, "adapter:alpha/adapter_config.json item 1"),
    ]
    try:
        for file, status, message in cases:
            got, body = compare(server, {"models": MODELS, "file": file})
            assert got == status and message in body["error"]["message"], (file, got, body)
    finally:
        link.unlink(), (world["data"] / "notes.txt").unlink()


def test_compare_refuses_bad_requests_in_openai_shape(server):
    upload = {"name": "ten.jsonl", "content": server["world"]["ten"].read_text()}
    bad_row = {"name": "bad.jsonl", "content": '{"text": "fine"}\n{"text": \n'}
    cases = [
        ({"models": MODELS}, 400, "give exactly one data source"),
        ({**ten(), "upload": upload}, 400, "give exactly one data source"),
        ({**ten(), "models": [BASE, "nope"]}, 404, "the model 'nope' does not exist"),
        ({**ten(), "models": [BASE, BASE]}, 400, "a model is named twice"),
        ({**ten(), "models": []}, 400, "models"),
        ({**ten(), "limit": 0}, 400, "limit"),
        ({**ten(), "temperature": 1}, 400, "unrecognized request argument: temperature"),
        ({"models": MODELS, "upload": {"name": "x.parquet", "content": "PAR1"}}, 400, "upload a .csv, .json"),
        ({"models": MODELS, "upload": bad_row}, 400, "bad.jsonl (uploaded) line 2"),
        ({"models": MODELS, "upload": {"name": "big.jsonl", "content": "x" * 70_000}}, 413, "larger than"),
    ]
    for body, status, message in cases:
        got, answer = compare(server, body)
        assert got == status and message in answer["error"]["message"], (body.get("upload"), got, answer)
        assert "lorakit-compare-" not in answer["error"]["message"]  # no temporary paths in messages
    assert compare(server, ten(), key=None)[0] == 401


def test_one_comparison_at_a_time_and_a_client_that_leaves_cancels_it(server):
    engine = server["engine"]
    slow = engine.model.register_forward_hook(lambda *args: time.sleep(0.05))  # every engine step 50 ms
    try:
        stream = httpx.stream("POST", server["url"] + "/v1/lorakit/compare", json=ten(),
                              headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        response = stream.__enter__()
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the job runs
        busy, body = compare(server, ten())
        assert busy == 429 and body["error"]["code"] == "comparison_running"
        stream.__exit__(None, None, None)  # the client leaves mid-way
        deadline = time.monotonic() + 30
        while engine.stats()["running"] + engine.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0
    finally:
        slow.remove()
    deadline = time.monotonic() + 30
    while True:  # the job's thread notices within a step, then the next comparison may start
        status, events = compare(server, ten(limit=2))
        if status != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 200 and events[-1]["report"]["rows"] == 2


def test_a_comparison_alone_and_beside_chat_requests_gives_the_same_report(server):
    """The compare job's requests share the engine's batches with other clients'; nothing changes."""
    oracle = server["world"]["oracle"]
    results = []

    def chat():
        for _ in range(6):
            results.append(httpx.post(server["url"] + "/v1/chat/completions", timeout=120,
                                      headers={"Authorization": f"Bearer {KEY}"},
                                      json={"model": "beta", "messages": [{"role": "user", "content": "Hi"}],
                                            "max_tokens": 12, "temperature": 0}).status_code)

    threads = [threading.Thread(target=chat) for _ in range(2)]
    for t in threads:
        t.start()
    status, events = compare(server, ten())
    for t in threads:
        t.join()
    assert status == 200 and results == [200] * 12
    assert_same_as_eval(events[-1]["report"], oracle)


def test_the_page_files_are_package_data():
    """A wheel carries every file the page serves (pyproject's package-data lists them)."""
    tomllib = pytest.importorskip("tomllib")
    from pathlib import Path

    import lorakit
    from lorakit.serve.page import STATIC

    package = Path(lorakit.__file__).parent
    pyproject = tomllib.loads((package.parents[1] / "pyproject.toml").read_text())
    listed = pyproject["tool"]["setuptools"]["package-data"]
    shipped = {f"{package_name}/{name}" for package_name, names in listed.items() for name in names}
    files = [STATIC / "index.html", *(path for path, _ in ASSETS.values())]
    needed = {f"lorakit.{path.relative_to(package).parts[0]}/{path.relative_to(package).as_posix().split('/', 1)[1]}"
              for path in files}
    assert needed <= shipped, needed - shipped
