"""lm-evaluation-harness 0.4.13 itself against ``lorakit serve`` (the command, in a subprocess on a
free loopback port) and against its own in-process ``hf`` model with ``peft=ADAPTER`` (PEFT loading
the same adapter folder): the same per-sample loglikelihoods (1e-4), the same generations and the
same metrics, for the base, a LoRA adapter (every linear layer, the output head and the embeddings)
and a DoRA adapter, on three local tasks (``tests/lm_eval_tasks``: multiple choice,
``loglikelihood_rolling``, ``generate_until``), with lm-eval's defaults (``tokenized_requests=True``,
which finds the server's ``/tokenize`` and tokenizes through it); and ``num_concurrent=8`` gives the
results of ``num_concurrent=1``.

A tiny random Llama with SmolLM2's tokenizer keeps this fast; the numbers are those of a random
model, but the comparison is exact either way."""

from __future__ import annotations

import contextlib
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import lm_eval  # the test extra (lm-eval[api]==0.4.13): a missing install fails here, it is not skipped
import pytest
import torch
from serve.serve_helpers import peft_lora_and_dora

TASKS_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
NAMES = [None, "lora", "dora"]
EXACT = ("acc,none", "acc_norm,none", "exact_match,none", "sample_len")  # counts of samples: equal, not close



@contextlib.contextmanager
def in_folder(folder: Path):
    before = os.getcwd()
    os.chdir(folder)  # lm-eval reads a task's data_files relative to the working folder
    try:
        yield
    finally:
        os.chdir(before)


def evaluate(model, **kwargs) -> dict:
    from lm_eval.tasks import TaskManager

    with in_folder(TASKS_DIR):
        return lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path=str(TASKS_DIR)),
                                       log_samples=True, **kwargs)


@pytest.fixture(scope="module")
def tiny(smollm2_path, tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer saved as a base folder, and PEFT's LoRA and DoRA adapters."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_path))
    root = tmp_path_factory.mktemp("lm-eval")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    return root / "base", peft_lora_and_dora(model, root / "adapters")


@pytest.fixture(scope="module")
def server(tiny):
    """``lorakit serve`` over the tiny base and both adapters."""
    base, folders = tiny
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--base", str(base), "--served-model-name", "tiny",
               "--port", str(port), "--log-level", "warning"]
    for name, folder in folders.items():
        command += ["--adapter", f"{name}={folder}"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert process.poll() is None, process.communicate()[1]
        yield url
    finally:
        process.terminate()
        process.communicate(timeout=60)


@pytest.fixture(scope="module")
def results(tiny, server):
    """lm-eval's results per model: in process (``hf`` + ``peft``), served with 1 and with 8 concurrent requests."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    base, folders = tiny
    cache: dict = {}

    def get(name: str | None, how: str) -> dict:
        if (name, how) not in cache:
            if how == "hf":
                args = {"pretrained": str(base), "dtype": "float32", "device": "cpu", "batch_size": 4}
                if name is not None:
                    args["peft"] = str(folders[name])
                cache[name, how] = evaluate("hf", model_args=args)
            else:
                lm = LocalCompletionsAPI(model=name or "tiny", base_url=f"{server}/v1/completions",
                                         num_concurrent=int(how), max_retries=1)
                assert lm.tokenizer_backend == "remote" and lm.tokenized_requests  # lm-eval's defaults found /tokenize
                cache[name, how] = evaluate(lm)
        return cache[name, how]

    return get


def per_sample(result: dict, task: str) -> list:
    """Each sample's responses, by document: (loglikelihood, is_greedy) pairs, rolling sums or texts."""
    return [s["resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


def assert_same(served: dict, local: dict, tolerance: float = 1e-4) -> float:
    """Every response and metric of ``served`` equals ``local``'s; returns the largest loglikelihood gap."""
    worst = 0.0
    for task in TASKS:
        ours, theirs = per_sample(served, task), per_sample(local, task)
        assert len(ours) == len(theirs) > 0
        for mine, other in zip(ours, theirs):
            assert len(mine) == len(other)
            for (a,), (b,) in zip(mine, other):  # one response per request
                if isinstance(b, str):
                    assert a == b  # generate_until: the same text
                    continue
                if isinstance(b, float):  # loglikelihood_rolling: the text's sum
                    gap = abs(a - b)
                else:  # (loglikelihood, is_greedy)
                    gap = abs(a[0] - b[0])
                    assert a[1] == b[1]
                assert gap <= tolerance, (task, a, b)
                worst = max(worst, gap)
        metrics, expected = served["results"][task], local["results"][task]
        for key, value in expected.items():
            if key in ("name", "alias") or key.endswith("_stderr,none") and not isinstance(value, float):
                continue
            if key in EXACT:
                assert metrics[key] == value, (task, key)
            else:  # perplexities: functions of summed loglikelihoods
                assert math.isclose(metrics[key], value, rel_tol=1e-5), (task, key, metrics[key], value)
    return worst


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES, ids=["base", "lora", "dora"])
def test_served_scores_equal_lm_eval_in_process(results, name):
    served, local = results(name, "1"), results(name, "hf")
    print(f"{name or 'base'}: largest |served - in process| loglikelihood {assert_same(served, local):.2e}")
    # Not vacuous: the responses are real numbers and texts, and each adapter changes them.
    assert any(not text[0][0].isspace() for text in per_sample(local, "tiny_gen"))
    if name is not None:
        plain = per_sample(results(None, "hf"), "tiny_mc")
        ours = per_sample(served, "tiny_mc")
        assert max(abs(a[0][0] - b[0][0]) for x, y in zip(ours, plain) for a, b in zip(x, y)) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lora", "dora"])
def test_eight_concurrent_requests_give_the_results_of_one(results, name):
    gap = assert_same(results(name, "8"), results(name, "1"), tolerance=1e-5)
    print(f"{name}: largest |8 concurrent - 1| loglikelihood {gap:.2e}")


@pytest.mark.slow
def test_the_prefix_cache_served_the_multiple_choice_contexts(results, server):
    results("lora", "1")
    metrics = httpx.get(f"{server}/metrics").text
    hits = next(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("lorakit_prefix_cache_hit_tokens_total"))
    assert hits > 8 * 3 * 20  # 8 questions: 3 of 4 choices reuse a context of 20+ tokens at least
