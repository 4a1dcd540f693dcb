"""The OpenAI-compatible server on a tiny random model, through the real ``openai`` client on a
loopback port: outputs equal the engine's own greedy output for the same request, streaming,
every error in OpenAI's shape, disconnects, the bounded queue, runtime adapters and their
path checks, metrics, and the ``lorakit serve`` command's argument handling."""

from __future__ import annotations

import copy
import json
import os
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from conftest import make_tiny
from serve.serve_helpers import ChatWordTokenizer, save_random_adapter

from lorakit.serve import Engine, SamplingParams
from lorakit.serve.asgi import BackgroundServer
from lorakit.serve.http import create_app

BASE = "tiny-llama"
KEY = "sk-test-key"
GREEDY = dict(temperature=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A running server over base + adapters a and b (c is loadable at run time from the root),
    and a reference engine with all three, driven synchronously in the test's thread."""
    base = make_tiny("llama")
    base.config.eos_token_id = base.generation_config.eos_token_id = None  # exact lengths
    root = tmp_path_factory.mktemp("adapter-root")
    folders = {name: save_random_adapter(base, root / name, r=4, seed=seed)
               for name, seed in (("a", 1), ("b", 2), ("c", 3))}
    engine = Engine(copy.deepcopy(base), ChatWordTokenizer(), max_batch=4, max_resident=2, max_rank=8)
    reference = Engine(copy.deepcopy(base), ChatWordTokenizer(), max_resident=3, max_rank=8)
    for name, folder in folders.items():
        reference.load_adapter(name, folder)
        if name != "c":
            engine.load_adapter(name, folder)
    app = create_app(engine, BASE, api_key=KEY, adapter_root=root, max_queue=2, max_body_bytes=16 * 1024)
    with BackgroundServer(app) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield dict(server=server, url=server.url, client=client, engine=engine, reference=reference,
                   state=app.state.server, root=root, base=base)
    assert not engine.running_in_background  # the app stopped the engine it started


def expected(served, model, max_tokens, **prompt):
    adapter = None if model == BASE else model
    return served["reference"].submit(**prompt, adapter=adapter,
                                      params=SamplingParams(max_tokens=max_tokens, **GREEDY)).result()


def post(served, path, body=None, key=KEY, timeout=60.0):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{served['url']}{path}", json=body, headers=headers, timeout=timeout)


def sse_events(lines):
    """The ``data:`` payloads of a server-sent event stream (``[DONE]`` kept as a string)."""
    payloads = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    return [p if p == "[DONE]" else json.loads(p) for p in payloads]


# -- the happy path -----------------------------------------------------------------------------------

def test_models_lists_the_base_and_each_adapter_with_its_parent(served):
    models = {m.id: m for m in served["client"].models.list().data}
    assert set(models) == {BASE, "a", "b"}
    assert models[BASE].model_extra["parent"] is None
    assert models["a"].model_extra["parent"] == BASE and models["b"].model_extra["parent"] == BASE
    assert models["a"].model_extra["root"] == str(served["root"] / "a")
    assert models[BASE].model_extra["max_model_len"] == 64


def test_completions_equal_the_engines_greedy_output(served):
    client = served["client"]
    texts = {}
    for model in (BASE, "a", "b"):
        got = client.completions.create(model=model, prompt="w3 w14 w15 w92", max_tokens=8, temperature=0)
        want = expected(served, model, 8, prompt="w3 w14 w15 w92")
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert got.model == model and got.object == "text_completion"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (4, 8, 12)
        texts[model] = got.choices[0].text
        by_ids = client.completions.create(model=model, prompt=[3, 14, 15, 92], max_tokens=8, temperature=0)
        assert by_ids.choices[0].text == want.text
    assert len(set(texts.values())) == 3  # not vacuous: each adapter changes the output


def test_chat_completions_equal_the_engines_greedy_output(served):
    client = served["client"]
    messages = [{"role": "system", "content": "w7 w8"}, {"role": "user", "content": "w20 w21 w22"}]
    texts = set()
    for model in (BASE, "a", "b"):
        got = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        want = expected(served, model, 6, messages=messages)
        choice = got.choices[0]
        assert choice.message.role == "assistant" and choice.message.content == want.text
        assert choice.finish_reason == "length" and got.object == "chat.completion"
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (5, 6)
        texts.add(choice.message.content)
    assert len(texts) == 3
    # No max_tokens in chat: up to the context (64 - 5 prompt tokens).
    full = client.chat.completions.create(model="a", messages=messages, temperature=0)
    assert full.usage.completion_tokens == 59 and full.choices[0].finish_reason == "length"


def test_streaming_completion_and_chat(served):
    client = served["client"]
    want = expected(served, "b", 10, prompt="w5 w6 w7")
    chunks = list(client.completions.create(model="b", prompt="w5 w6 w7", max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and len(chunks) > 2

    messages = [{"role": "user", "content": "w9 w10"}]
    want = expected(served, "a", 7, messages=messages)
    stream = client.chat.completions.create(model="a", messages=messages, max_tokens=7, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == 2 and all(c.usage is None for c in chunks[:-1])

    with httpx.stream("POST", f"{served['url']}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": BASE, "prompt": "w1 w2", "max_tokens": 3, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(response.iter_lines()))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"


def test_stop_strings_seed_and_default_max_tokens(served):
    client = served["client"]
    full = expected(served, "a", 12, prompt="w4 w5")
    stop = " " + full.text.split()[5]  # the sixth word
    got = client.completions.create(model="a", prompt="w4 w5", max_tokens=12, temperature=0, stop=[stop, "w999"])
    assert got.choices[0].text == full.text[: full.text.index(stop)] and got.choices[0].finish_reason == "stop"
    assert client.completions.create(model=BASE, prompt="w4 w5", temperature=0).usage.completion_tokens == 16
    sampled = [client.completions.create(model="b", prompt="w4 w5", max_tokens=12, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text for seed in (11, 11, 12)]
    assert sampled[0] == sampled[1] != sampled[2]
    vllm_extras = client.completions.create(model="b", prompt="w4 w5", max_tokens=5, temperature=0.8,
                                            extra_body={"top_k": 5, "min_tokens": 5, "ignore_eos": True})
    assert vllm_extras.usage.completion_tokens == 5


# -- errors -------------------------------------------------------------------------------------------

def error_of(response):
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_unknown_model_is_404_model_not_found(served):
    with pytest.raises(openai.NotFoundError) as caught:
        served["client"].completions.create(model="nope", prompt="w1", max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.param == "model"
    assert "nope" in caught.value.message and "served models: tiny-llama, a, b" in caught.value.message


def test_prompt_over_the_context_is_400_context_length_exceeded(served):
    with pytest.raises(openai.BadRequestError) as caught:
        served["client"].chat.completions.create(model="a", messages=[{"role": "user", "content": "w1 " * 70}])
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        served["client"].completions.create(model=BASE, prompt="w1 " * 60, max_tokens=10)
    assert caught.value.code == "context_length_exceeded" and "maximum context length is 64" in caught.value.message


@pytest.mark.parametrize("extra, param, words", [
    ({"temperature": -1}, "temperature", "greater than or equal to 0"),
    ({"temperature": "hot"}, "temperature", "valid number"),
    ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
    ({"n": 0}, "n", "greater than or equal to 1"),
    ({"n": 200}, "n", "less than or equal to 128"),
    ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"best_of": 2}, "best_of", "not supported"),
    ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"max_token": 5}, "max_token", "unrecognized request argument"),
    ({"stop": 5}, "stop", "a string or a list of strings"),
    ({"prompt": [3, 10_000]}, "prompt", "token ids must lie in [0, 96)"),
    ({"prompt": []}, "prompt", "an empty list"),
    ({"prompt": [[1, 2], [3, 10_000]]}, "prompt", "token ids must lie in [0, 96)"),
    ({"prompt": ["w1 " * 30, "w1 " * 70]}, "prompt", "maximum context length is 64"),
    ({"prompt": {"text": "w1"}}, "prompt", "expected a string, a list of strings, a list of token ids"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens must be"),
])
def test_invalid_parameters_are_400_naming_the_parameter(served, extra, param, words):
    response = post(served, "/v1/completions", {"model": "a", "prompt": "w1 w2", "max_tokens": 4, **extra})
    error = error_of(response)
    assert response.status_code == 400 and error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"


def test_chat_parameter_errors_name_the_field(served):
    response = post(served, "/v1/chat/completions", {"model": "a", "messages": [{"role": "robot", "content": "w1"}]})
    assert response.status_code == 400 and error_of(response)["param"] == "messages"
    response = post(served, "/v1/chat/completions", {"model": "a", "messages": [{"role": "user", "content": "w1"}],
                                                     "top_logprobs": 2})
    assert response.status_code == 400 and error_of(response)["param"] == "top_logprobs"
    assert "needs logprobs: true" in error_of(response)["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        served["client"].chat.completions.create(model="a", messages=[], max_tokens=2)
    assert caught.value.param == "messages"


def test_malformed_json_oversized_bodies_and_unknown_routes(served):
    url, auth = served["url"], {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{url}/v1/completions", content=b'{"model": "a", "prompt": ', headers=auth)
    assert response.status_code == 400 and "not valid JSON" in error_of(response)["message"]
    response = httpx.post(f"{url}/v1/chat/completions", content=b"[1, 2]", headers=auth)
    assert response.status_code == 400 and "must be a JSON object" in error_of(response)["message"]
    big = json.dumps({"model": "a", "prompt": "w1 " * 10_000}).encode()
    response = httpx.post(f"{url}/v1/completions", content=big, headers=auth)
    assert response.status_code == 413 and error_of(response)["code"] == "request_too_large"
    chunked = httpx.post(f"{url}/v1/completions", content=iter([big[:8192]] * 3), headers=auth)  # no Content-Length
    assert chunked.status_code == 413 and "16384 bytes" in error_of(chunked)["message"]
    response = httpx.get(f"{url}/v1/nothing-here", headers=auth)
    assert response.status_code == 404 and error_of(response)["message"].startswith("GET /v1/nothing-here")


def test_missing_or_wrong_api_key_is_401(served):
    for key in (None, "sk-wrong"):
        response = post(served, "/v1/completions", {"model": "a", "prompt": "w1"}, key=key)
        assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = openai.OpenAI(base_url=f"{served['url']}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(f"{served['url']}/health").json() == {"status": "ok"}  # open, as in vLLM


# -- load shedding and disconnects --------------------------------------------------------------------

def test_queue_full_is_429_and_the_queued_requests_still_finish(served):
    """Freeze the engine; fill max_batch (4) + max_queue (2) places; the seventh request is refused at
    once; after the thaw the six finish with the right output."""
    engine, state, client = served["engine"], served["state"], served["client"]
    prompts = [f"w{i} w{i + 1}" for i in range(1, 7)]
    results = {}

    def ask(i):
        results[i] = client.completions.create(model="ab"[i % 2], prompt=prompts[i], max_tokens=5, temperature=0)

    with engine._step_lock:  # the engine's loop waits at its next step
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        _wait_for(lambda: state.in_flight == 6)
        with pytest.raises(openai.RateLimitError) as caught:
            client.completions.create(model=BASE, prompt="w1", max_tokens=2)
        assert caught.value.code == "queue_full" and caught.value.response.headers["retry-after"] == "1"
    for t in threads:
        t.join(timeout=60)
    for i in range(6):
        assert results[i].choices[0].text == expected(served, "ab"[i % 2], 5, prompt=prompts[i]).text


@pytest.fixture
def slow_engine(served, monkeypatch):
    """Every forward of the served engine takes at least 20 ms: a 40-token request lasts ~1 s."""
    engine = served["engine"]
    forward = engine._forward

    def slow(*args, **kwargs):
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine, "_forward", slow)
    return engine


def test_a_client_that_disconnects_frees_its_batch_slot(served, slow_engine):
    state, engine = served["state"], slow_engine
    cancelled = state.metrics.finished["cancelled"]
    with httpx.stream("POST", f"{served['url']}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "a", "messages": [{"role": "user", "content": "w1 w2"}], "max_tokens": 40,
                            "stream": True}) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
        _wait_for(lambda: engine.stats()["running"] == 1, timeout=5)  # it joins the batch after its first token
    _wait_for(lambda: engine.stats()["running"] == 0 and engine.stats()["waiting"] == 0, timeout=5)
    assert state.in_flight == 0 and state.metrics.finished["cancelled"] == cancelled + 1
    # A client waiting for a whole (non-streamed) completion that gives up is cancelled too.
    with pytest.raises(httpx.ReadTimeout):
        post(served, "/v1/completions", {"model": "b", "prompt": "w1", "max_tokens": 40}, timeout=0.3)
    _wait_for(lambda: engine.stats()["running"] == 0 and state.in_flight == 0, timeout=5)
    assert state.metrics.finished["cancelled"] == cancelled + 2


def _wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- runtime adapters ---------------------------------------------------------------------------------

def test_load_use_and_unload_an_adapter_at_run_time(served):
    client = served["client"]
    response = post(served, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": "c"})  # relative to the root
    assert response.status_code == 200 and "'c' added" in response.text
    assert "c" in {m.id for m in client.models.list().data}
    got = client.completions.create(model="c", prompt="w30 w31", max_tokens=6, temperature=0)
    assert got.choices[0].text == expected(served, "c", 6, prompt="w30 w31").text
    response = post(served, "/v1/load_lora_adapter", {"lora_name": "c", "lora_path": str(served["root"] / "c")})
    assert response.status_code == 400 and error_of(response)["param"] == "lora_name"  # already served
    assert post(served, "/v1/unload_lora_adapter", {"lora_name": "c"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt="w30 w31", max_tokens=6)
    response = post(served, "/v1/unload_lora_adapter", {"lora_name": "c"})
    assert response.status_code == 404 and error_of(response)["code"] == "model_not_found"


def test_runtime_loading_refuses_paths_outside_the_root_and_pickles(served, tmp_path):
    root, base = served["root"], served["base"]
    outside = save_random_adapter(base, tmp_path / "outside", r=2, seed=5)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    sneaky = root / "sneaky"
    sneaky.mkdir()
    (sneaky / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (sneaky / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    torch.save({}, pickled / "adapter_model.bin")
    try:
        refusals = [
            ({"lora_name": "x", "lora_path": str(outside)}, 403, "outside the adapter root"),
            ({"lora_name": "x", "lora_path": f"a/../../{outside.parent.name}/outside"}, 403, "'..'"),
            ({"lora_name": "x", "lora_path": "escape"}, 403, "outside the adapter root"),
            ({"lora_name": "x", "lora_path": "sneaky"}, 403, "links outside the adapter root"),
            ({"lora_name": "x", "lora_path": "pickled"}, 400, "pickle file"),
            ({"lora_name": "x", "lora_path": "missing"}, 400, "not a folder"),
            ({"lora_name": "../x", "lora_path": "a"}, 400, "is not allowed"),
            ({"lora_name": "a b", "lora_path": "a"}, 400, "is not allowed"),
            ({"lora_name": BASE, "lora_path": "a"}, 400, "already served"),
            ({"lora_name": "x"}, 400, "missing"),
        ]
        for body, status, words in refusals:
            response = post(served, "/v1/load_lora_adapter", body)
            assert response.status_code == status and words in error_of(response)["message"], (body, response.text)
        assert "x" not in served["engine"].registry
    finally:
        for path in (root / "escape", sneaky / "adapter_model.safetensors"):
            path.unlink()


def test_runtime_loading_is_off_without_an_adapter_root(served):
    from fastapi.testclient import TestClient

    with TestClient(create_app(served["engine"], BASE)) as client:  # the engine is already running
        response = client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"})
        assert response.status_code == 403 and "--adapter-root" in error_of(response)["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "a"}).status_code == 403
    assert served["engine"].running_in_background  # not stopped by an app that did not start it


# -- metrics and the command --------------------------------------------------------------------------

def test_metrics_are_prometheus_text(served):
    served["client"].completions.create(model="a", prompt="w2 w3", max_tokens=3, temperature=0)
    response = httpx.get(f"{served['url']}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['lorakit_requests_total{route="/v1/completions",code="200"}'] >= 1
    assert samples['lorakit_generation_tokens_total{model="a"}'] >= 3
    count = samples["lorakit_request_latency_seconds_count"]
    assert samples['lorakit_request_latency_seconds_bucket{le="+Inf"}'] == count
    assert count == sum(served["state"].metrics.finished.values())
    assert samples["lorakit_requests_waiting"] == 0 and samples["lorakit_adapters_loaded"] == 2
    assert 1 <= samples["lorakit_adapters_resident"] <= 2
    assert samples['lorakit_requests_total{route="/v1/completions",code="400"}'] >= 1


def test_serve_command_checks_its_arguments_before_loading(capsys, tmp_path):
    from lorakit.cli import main
    from lorakit.commands.serve import parse_adapters

    assert parse_adapters(["sql=runs/sql", "chat=/abs/chat"]) == {"sql": "runs/sql", "chat": "/abs/chat"}
    for argv, words in [(["--adapter", "sql"], "expected NAME=DIR"),
                        (["--adapter", "a=x", "--adapter", "a=y"], "given twice"),
                        (["--adapter", "bad name=x"], "is not allowed"),
                        (["--adapter-root", str(tmp_path / "none")], "is not a folder")]:
        assert main(["serve", "--base", "m", *argv]) == 2
        assert words in capsys.readouterr().err


def test_null_parameters_mean_their_defaults(served):
    body = {"model": "a", "prompt": "w1 w2", "max_tokens": 3, "temperature": None, "top_p": None, "n": None,
            "stop": None, "seed": None, "presence_penalty": None, "stream": None, "logprobs": None}
    response = post(served, "/v1/completions", body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_lorakit_serve_end_to_end(smollm2_path, tmp_path):
    """The command in a subprocess: a tiny random Llama with SmolLM2's tokenizer and chat template,
    one adapter, an API key; the openai client chats with it; Ctrl-C stops it cleanly."""
    import signal
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    save_random_adapter(model, tmp_path / "sql", r=2, seed=1)
    port = free_port()
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--base", str(tmp_path / "model"), "--adapter",
               f"sql={tmp_path / 'sql'}", "--port", str(port), "--served-model-name", "tiny", "--log-level", "warning"]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "LORAKIT_API_KEY": KEY, "OMP_NUM_THREADS": "1"})
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        _wait_for(lambda: server.poll() is not None or _healthy(port), timeout=120)
        assert server.poll() is None
        assert [m.id for m in client.models.list().data] == ["tiny", "sql"]
        answer = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=4, temperature=0)
        assert answer.usage.completion_tokens <= 4 and answer.usage.prompt_tokens > 10  # the template's prompt
    finally:
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err
    assert f"serving tiny, sql at http://127.0.0.1:{port}/v1" in err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port):
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False
