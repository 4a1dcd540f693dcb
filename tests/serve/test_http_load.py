"""A short load test of the HTTP server (``benchmarks/serve_load.py`` is the long one): concurrent
clients over three adapters and the base, malformed requests interleaved with good ones, and an
adapter loaded, used and unloaded while the others run. Nothing fails, nothing is lost, and every
good answer equals the engine's greedy output for its request alone."""

from __future__ import annotations

import copy
import json
import threading

import httpx
import pytest
from conftest import make_tiny
from serve.serve_helpers import WordTokenizer, save_random_adapter

from lorakit.serve import Engine, SamplingParams
from lorakit.serve.asgi import BackgroundServer
from lorakit.serve.http import create_app

BASE = "tiny"
KEY = "sk-load"
CLIENTS, PER_CLIENT, NEW_TOKENS = 8, 15, 6
PROMPTS = [[(7 * i + 3 * j) % 90 + 1 for j in range(2 + i % 5)] for i in range(6)]
# (body or raw bytes, headers override, expected status) — each interleaved between good requests.
MALFORMED = [
    (b'{"model": "a", "prompt": [1, 2', None, 400),
    ({"model": "zz", "prompt": [1], "max_tokens": 2}, None, 404),
    ({"model": "a", "prompt": [1], "temperature": -3}, None, 400),
    ({"model": "b", "prompt": [1, 100_000], "max_tokens": 2}, None, 400),
    ({"model": "c", "prompt": [1] * 70}, None, 400),
    ({"model": "a", "prompt": "w1 " * 3000}, None, 413),
    ({"model": "a", "prompt": [1]}, {"Authorization": "Bearer wrong"}, 401),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_tiny("llama", seed=1)
    base.config.eos_token_id = base.generation_config.eos_token_id = None
    root = tmp_path_factory.mktemp("load-adapters")
    folders = {name: save_random_adapter(base, root / name, r=2 + 2 * i, seed=10 + i) for i, name in enumerate("abcd")}
    reference = Engine(copy.deepcopy(base), WordTokenizer(), max_resident=4, max_rank=8)
    for name, folder in folders.items():
        reference.load_adapter(name, folder)
    models = [None, "a", "b", "c", "d"]
    expected = {}
    for model in models:
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
        handles = [reference.submit(prompt_ids=p, adapter=model, params=params) for p in PROMPTS]
        for i, handle in enumerate(handles):
            expected[(model or BASE, i)] = handle.result().text
    engine = Engine(copy.deepcopy(base), WordTokenizer(), max_batch=8, max_resident=2, max_rank=8)
    for name in "abc":
        engine.load_adapter(name, folders[name])
    return engine, root, expected


def test_concurrent_clients_malformed_requests_and_hot_adapters(setup):
    engine, root, expected = setup
    app = create_app(engine, BASE, api_key=KEY, adapter_root=root, max_queue=64, max_body_bytes=8 * 1024)
    failures: list[str] = []
    good, malformed = {"n": 0}, {"n": 0}
    lock = threading.Lock()

    def check_good(client, model, i, stream):
        body = {"model": model, "prompt": PROMPTS[i], "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream}
        if stream:
            with client.stream("POST", "/v1/completions", json=body) as response:
                lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
                status = response.status_code
            text = "".join(json.loads(x)["choices"][0]["text"] for x in lines[:-1]) if status == 200 else None
            ok = status == 200 and lines[-1] == "[DONE]"
        else:
            response = client.post("/v1/completions", json=body)
            status, ok = response.status_code, response.status_code == 200
            text = response.json()["choices"][0]["text"] if ok else None
        with lock:
            good["n"] += 1
            if not ok or text != expected[(model, i)]:
                failures.append(f"{model} prompt {i} stream={stream}: {status} {text!r}")

    def client_thread(c, url):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            for k in range(PER_CLIENT):
                n = c * PER_CLIENT + k
                check_good(client, [BASE, "a", "b", "c"][n % 4], n % len(PROMPTS), stream=n % 3 == 0)
                if k % 3 == 1:
                    body, headers, status = MALFORMED[n % len(MALFORMED)]
                    if isinstance(body, bytes):
                        kwargs = {"content": body, "headers": {"Content-Type": "application/json"}}
                    else:
                        kwargs = {"json": body, "headers": headers}
                    got = client.post("/v1/completions", **kwargs).status_code
                    with lock:
                        malformed["n"] += 1
                        if got != status:
                            failures.append(f"malformed {body!r:.60}: {got}, expected {status}")

    def hot_adapter(url):
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            for _ in range(3):
                loaded = client.post("/v1/load_lora_adapter", json={"lora_name": "d", "lora_path": "d"})
                for i in range(3):
                    check_good(client, "d", i, stream=i == 1)
                unloaded = client.post("/v1/unload_lora_adapter", json={"lora_name": "d"})
                gone = client.post("/v1/completions", json={"model": "d", "prompt": [1], "max_tokens": 2})
                statuses = (loaded.status_code, unloaded.status_code, gone.status_code)
                if statuses != (200, 200, 404):
                    with lock:
                        failures.append(f"load, unload, use after unload of d: {statuses}")

    with BackgroundServer(app) as server:
        threads = [threading.Thread(target=client_thread, args=(c, server.url)) for c in range(CLIENTS)]
        threads.append(threading.Thread(target=hot_adapter, args=(server.url,)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        metrics = httpx.get(f"{server.url}/metrics").text
        state = app.state.server
        assert not any(t.is_alive() for t in threads)
        assert failures == []
        assert good["n"] == CLIENTS * PER_CLIENT + 9 and malformed["n"] == CLIENTS * PER_CLIENT // 3
        assert state.metrics.finished == {"length": good["n"]}  # none cancelled, none failed, none lost
        assert state.in_flight == 0 and engine.stats()["running"] == engine.stats()["waiting"] == 0
        assert f'lorakit_requests_finished_total{{reason="length"}} {good["n"]}' in metrics
