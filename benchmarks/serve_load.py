"""Load test of ``lorakit serve``: concurrent clients over several adapters, bad requests mixed in,
an adapter loaded and unloaded under load. Reports latency percentiles and tokens/s, and checks that
nothing failed, nothing was lost, and every answer equals the one the idle server gave.

    python benchmarks/serve_load.py [--model tiny|smollm2-135m-instruct] [--clients 16] [--requests 512] \
        [--max-tokens 16] [--adapters 3] [--rank 8] [--max-batch 16] [--malformed-every 4] \
        [--threads 1] [--json FILE]

What it does:

1. Writes ``--adapters`` random PEFT adapters (plus one more, ``hot``) for the model into a
   temporary adapter root. ``--model tiny`` (the default, a few minutes on 2 CPU cores) is a
   random-init 2-layer Llama with SmolLM2's tokenizer and chat template; any base model spec works
   (``smollm2-135m-instruct`` for the real one).
2. Starts ``lorakit serve`` in a subprocess on a free loopback port, with an API key and
   ``--adapter-root``.
3. Reference pass, one request at a time: every (model, prompt, endpoint) combination once.
4. Load: ``--clients`` threads send ``--requests`` good requests in all (base and each adapter in
   turn; completions and chat; half of them streamed; greedy, ``ignore_eos`` so each generates
   exactly ``--max-tokens``); after every ``--malformed-every``-th, a client also sends a bad one
   (malformed JSON, unknown model, bad parameter, token id out of range, prompt over the context,
   body too large, wrong API key) and expects its exact status. Meanwhile another thread loops:
   load ``hot`` → 4 requests to it → unload → one request must get 404.
5. Checks: every good request answered 200 (streams end with ``[DONE]``), with the same text as
   in the reference pass, and the server's own token counter agrees with the clients' total.

Latency is per request from send to the last byte (client side); tokens/s is completion tokens
of the good requests over the wall time of the load phase, also given as a multiple of the
reference pass's rate (the same server, one request at a time). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = "sk-bench"
WORDS = ["able", "river", "light", "garden", "music", "stone", "winter", "market", "silver", "anchor", "forest",
         "pencil"]


def build_model(spec: str, root: Path) -> str:
    """The model spec to serve: ``tiny`` becomes a random 2-layer Llama saved with SmolLM2's tokenizer."""
    if spec != "tiny":
        return spec
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    folder = root / "tiny-llama"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_adapters(model_spec: str, root: Path, names: list[str], rank: int) -> None:
    from serve_engine import write_adapters as write_random

    from lorakit.models import load_model

    model = load_model(model_spec, dtype="fp32", device="cpu")
    for name, folder in zip(names, write_random(model, root / "tmp", len(names), rank, "all-linear")):
        folder.rename(root / name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, model: str, root: Path, adapters: list[str], port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "lorakit.cli", "serve", "--base", model, "--port", str(port),
               "--api-key", KEY, "--adapter-root", str(root), "--max-batch", str(args.max_batch),
               "--max-loaded", str(len(adapters) + 1), "--max-rank", str(args.rank), "--dtype", "fp32",
               "--device", "cpu", "--served-model-name", "base", "--log-level", "warning",
               "--max-body-bytes", str(64 * 1024)]
    for name in adapters:
        command += ["--adapter", f"{name}={root / name}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the server did not start; see its log above")
        time.sleep(0.5)


def good_body(model: str, prompt: int, chat: bool, stream: bool, max_tokens: int) -> dict:
    word = WORDS[prompt]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Define the word '{word}'."}]
    else:
        body["prompt"] = f"The word '{word}' means"
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def send_good(client: httpx.Client, body: dict) -> tuple[bool, str | None, int, float]:
    """(answered fully, text, completion tokens, seconds)."""
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    try:
        if body["stream"]:
            with client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    return False, None, 0, time.perf_counter() - start
                data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            if not data or data[-1] != "[DONE]":
                return False, None, 0, time.perf_counter() - start
            chunks = [json.loads(d) for d in data[:-1]]
            text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                           for c in chunks if c["choices"])
            tokens = chunks[-1]["usage"]["completion_tokens"]
        else:
            response = client.post(path, json=body)
            if response.status_code != 200:
                return False, None, 0, time.perf_counter() - start
            answer = response.json()
            choice = answer["choices"][0]
            text = choice["message"]["content"] if chat else choice["text"]
            tokens = answer["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError, IndexError):
        return False, None, 0, time.perf_counter() - start
    return True, text, tokens, time.perf_counter() - start


def malformed(n: int) -> tuple[dict, int]:
    """The n-th bad request (httpx keyword arguments) and the status it must get."""
    kinds = [
        ({"content": b'{"model": "base", "prompt": "x', "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": {"model": "no-such-adapter", "prompt": "x"}}, 404),
        ({"json": {"model": "a0", "prompt": "x", "top_p": 7}}, 400),
        ({"json": {"model": "a1", "prompt": [1, 10 ** 9]}}, 400),
        ({"json": {"model": "a2", "prompt": [1] * 10_000, "max_tokens": 4}}, 400),
        ({"json": {"model": "base", "prompt": "x" * 70_000}}, 413),
        ({"json": {"model": "base", "prompt": "x"}, "headers": {"Authorization": "Bearer nope"}}, 401),
        ({"json": {"model": "base", "prompt": "x", "best_of": 3}}, 400),
    ]
    return kinds[n % len(kinds)]


class Load:
    """The load phase's shared state: the next request number, results, and problems."""

    def __init__(self, args, expected: dict, models: list[str]) -> None:
        self.args, self.expected, self.models = args, expected, models
        self.lock = threading.Lock()
        self.next = 0
        self.latencies: list[float] = []
        self.tokens = 0
        self.failed: list[str] = []
        self.wrong: list[str] = []
        self.bad_answered = 0
        self.bad_wrong: list[str] = []
        self.hot_cycles = 0
        self.done = threading.Event()

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.args.requests:
                return None
            self.next += 1
            return self.next - 1

    def good(self, client: httpx.Client, model: str, prompt: int, chat: bool, stream: bool) -> None:
        ok, text, tokens, seconds = send_good(client, good_body(model, prompt, chat, stream, self.args.max_tokens))
        with self.lock:
            if not ok:
                self.failed.append(f"{model} prompt {prompt} chat={chat} stream={stream}")
                return
            self.latencies.append(seconds)
            self.tokens += tokens
            if text != self.expected[(model, prompt, chat)] or tokens != self.args.max_tokens:
                self.wrong.append(f"{model} prompt {prompt} chat={chat} stream={stream}: {text!r}")

    def client(self, url: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as client:
            while (n := self.take()) is not None:
                self.good(client, self.models[n % len(self.models)], n % len(WORDS), chat=n % 2 == 1,
                          stream=(n // 2) % 2 == 1)
                if n % self.args.malformed_every == 0:
                    kwargs, status = malformed(n // self.args.malformed_every)
                    got = client.post("/v1/completions", **kwargs).status_code
                    with self.lock:
                        self.bad_answered += 1
                        if got != status:
                            self.bad_wrong.append(f"{kwargs}: {got}, expected {status}")

    def hot_adapter(self, url: str) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as client:
            while not self.done.is_set():
                response = client.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "hot"})
                if response.status_code != 200:
                    self.failed.append(f"load hot: {response.status_code} {response.text}")
                    return
                for i in range(4):
                    self.good(client, "hot", i, chat=i % 2 == 1, stream=i >= 2)
                response = client.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
                gone = client.post("/v1/completions", json={"model": "hot", "prompt": "x", "max_tokens": 2})
                with self.lock:
                    self.hot_cycles += 1
                    if response.status_code != 200 or gone.status_code != 404:
                        self.failed.append(f"unload hot: {response.status_code}, then {gone.status_code}")


def reference_pass(url: str, models: list[str], max_tokens: int) -> dict:
    expected = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as client:
        client.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": "hot"}).raise_for_status()
        for model in [*models, "hot"]:
            for prompt in range(len(WORDS)):
                for chat in (False, True):
                    ok, text, _, _ = send_good(client, good_body(model, prompt, chat, False, max_tokens))
                    assert ok, (model, prompt, chat)
                    expected[(model, prompt, chat)] = text
        client.post("/v1/unload_lora_adapter", json={"lora_name": "hot"}).raise_for_status()
    return expected


def server_tokens(url: str) -> int:
    total = 0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("lorakit_generation_tokens_total{"):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (random 2-layer Llama) or a base model spec")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=512, help="good requests in all")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--malformed-every", type=int, default=4, help="one bad request after every N-th good one")
    parser.add_argument("--threads", type=int, default=1,
                        help="the server's torch threads (1: steadier on shared CPUs)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        root.mkdir()
        model = build_model(args.model, Path(tmp))
        names = [f"a{i}" for i in range(args.adapters)]
        write_adapters(model, root, names + ["hot"], args.rank)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(args, model, root, names, port)
        try:
            models = ["base", *names]
            start = time.perf_counter()
            expected = reference_pass(url, models, args.max_tokens)
            serial = len(expected) * args.max_tokens / (time.perf_counter() - start)
            print(f"reference pass: {len(expected)} requests one at a time, {serial:.0f} tokens/s", flush=True)
            tokens_before = server_tokens(url)
            load = Load(args, expected, models)
            clients = [threading.Thread(target=load.client, args=(url,)) for _ in range(args.clients)]
            hot = threading.Thread(target=load.hot_adapter, args=(url,))
            start = time.perf_counter()
            for t in [*clients, hot]:
                t.start()
            for t in clients:
                t.join()
            load.done.set()
            hot.join()
            wall = time.perf_counter() - start
            served_tokens = server_tokens(url) - tokens_before
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=60)

    sent = args.requests + 4 * load.hot_cycles
    answered = len(load.latencies)
    result = {
        "model": args.model, "clients": args.clients, "adapters": args.adapters, "rank": args.rank,
        "max_batch": args.max_batch, "max_tokens": args.max_tokens, "server_threads": args.threads,
        "good_requests": sent, "answered": answered, "failed": len(load.failed), "wrong_output": len(load.wrong),
        "lost": sent - answered - len(load.failed),
        "malformed_requests": load.bad_answered, "malformed_wrong_status": len(load.bad_wrong),
        "hot_adapter_cycles": load.hot_cycles, "wall_seconds": wall,
        "requests_per_second": answered / wall, "tokens_per_second": load.tokens / wall,
        "latency_p50": percentile(load.latencies, 50), "latency_p99": percentile(load.latencies, 99),
        "client_tokens": load.tokens, "server_tokens": served_tokens,
        "one_at_a_time_tokens_per_second": serial,
    }
    print(f"{args.model}: {args.clients} clients, base + {args.adapters} adapters (r={args.rank}), "
          f"max_batch {args.max_batch}, {args.max_tokens} tokens per request, server on {args.threads} thread(s)")
    print(f"good requests {sent}: answered {answered}, failed {result['failed']}, lost {result['lost']}, "
          f"output differing from the idle server's {result['wrong_output']}")
    print(f"malformed requests {load.bad_answered} interleaved: wrong status {len(load.bad_wrong)}")
    print(f"adapter 'hot' loaded, used 4x and unloaded {load.hot_cycles} times under load")
    print(f"wall {wall:.1f} s: {result['requests_per_second']:.1f} requests/s, {result['tokens_per_second']:.0f} "
          f"tokens/s ({result['tokens_per_second'] / serial:.1f}x one request at a time); latency p50 "
          f"{result['latency_p50']:.3f} s, p99 {result['latency_p99']:.3f} s")
    print(f"generated tokens: clients counted {load.tokens}, the server counted {served_tokens}")
    for problem in (load.failed + load.wrong + load.bad_wrong)[:10]:
        print("  problem:", problem)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = not (load.failed or load.wrong or load.bad_wrong or result["lost"]) and load.tokens == served_tokens
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
