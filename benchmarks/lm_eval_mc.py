"""lm-evaluation-harness' multiple-choice task through ``lorakit serve`` with the prefix cache, without
it, and lm-eval's in-process ``hf`` backend (PEFT loading the same adapter): wall time side by side.

    python benchmarks/lm_eval_mc.py [--model smollm2-135m-instruct] [--questions 24] [--shots 3] \
        [--rounds 2] [--concurrent 8] [--hf-batch-size 8] [--threads 1] [--json FILE]

The task: WordNet definitions (``benchmarks/wordnet_data.py``; Debian's ``wordnet-base``, no hub),
"which word means …", four words of the same part of speech to choose from, after ``--shots``
solved examples — an MMLU-like few-shot prompt (~150 tokens) whose choices are continuations of
1–4 tokens. lm-eval sends each (context, choice) as its own loglikelihood request (token ids,
``max_tokens: 1``, ``logprobs: 1``, ``echo: true``), so a question's four requests share all but
their last tokens, and every question shares the few-shot examples.

Each round (variants in rotating order; model loading and server start-up not timed):

- ``served, prefix cache``: ``lorakit serve`` in a subprocess (``--threads`` intra-op threads),
  lm-eval ``local-completions`` with ``num_concurrent=--concurrent`` and its defaults
  (``tokenized_requests=True``: it tokenizes through the server's ``/tokenize``);
- ``served, no cache``: the same with ``--prefix-cache-mb 0``;
- ``in-process hf``: lm-eval's ``HFLM`` with ``peft=ADAPTER``, ``batch_size=--hf-batch-size``, in
  this process with ``torch.set_num_threads(--threads)``.

The adapter is a random LoRA (r=16, every linear layer) saved in PEFT's format, so both sides do
adapter work. Servers restart every round (an empty cache). Prints each round's times and the
median of the per-round ratios; checks that all three give the same accuracy and per-sample
loglikelihoods (1e-3: SmolLM2 in fp32, different batching). Targets: served with the cache at most
1.5x the in-process time, and at least 1.5x faster than served without it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
VARIANTS = ("served, prefix cache", "served, no cache", "in-process hf")


def build_task(folder: Path, questions: int, shots: int, seed: int = 0) -> str:
    """Write the task YAML and JSONL into ``folder``; returns the task name."""
    sys.path.insert(0, str(HERE))
    from wordnet_data import read_synsets, wordnet_dir

    rng = random.Random(seed)
    synsets = [s for s in read_synsets(wordnet_dir()) if s.pos in ("noun", "verb") and " " not in s.words[0]
               and 20 <= len(s.definition) <= 90 and s.words[0].isalpha()]
    rng.shuffle(synsets)
    by_pos: dict[str, list[str]] = {}
    for s in synsets:
        by_pos.setdefault(s.pos, []).append(s.words[0])

    def item(s) -> tuple[str, list[str], int]:
        words = [s.words[0]]
        while len(words) < 4:
            other = rng.choice(by_pos[s.pos])
            if other not in words and other not in s.words:
                words.append(other)
        rng.shuffle(words)
        return s.definition, words, words.index(s.words[0])

    examples = [item(s) for s in synsets[:shots]]
    header = "Choose the word that matches the definition.\n\n" + "".join(
        f"Definition: {d}\nChoices: {', '.join(w)}\nWord: {w[a]}\n\n" for d, w, a in examples)
    rows = []
    for s in synsets[shots:shots + questions]:
        definition, words, answer = item(s)
        rows.append({"context": f"{header}Definition: {definition}\nChoices: {', '.join(words)}\nWord:",
                     "choices": words, "answer": answer})
    (folder / "wordnet_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "wordnet_mc.yaml").write_text(
        "task: wordnet_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: wordnet_mc.jsonl\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    return "wordnet_mc"


def save_adapter(base: str, folder: Path, rank: int = 16) -> Path:
    import torch

    import lorakit
    from lorakit.models import load_model

    model = load_model(base, dtype=torch.float32, device="cpu")
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)  # a trained-looking, modest update
    lorakit.save_adapter(model, folder)
    return folder


class Server:
    """``lorakit serve`` in a subprocess on a free loopback port."""

    def __init__(self, base: str, adapter: Path, threads: int, cache: bool) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        command = [sys.executable, "-m", "lorakit.cli", "serve", "--base", base, "--adapter", f"bench={adapter}",
                   "--port", str(self.port), "--log-level", "warning", "--max-rank", "16"]
        if not cache:
            command += ["--prefix-cache-mb", "0"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"lorakit serve exited: {self.process.communicate()[1][-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.5)
        raise RuntimeError("lorakit serve did not start within 300 s")

    def hit_tokens(self) -> float:
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith("lorakit_prefix_cache_hit_tokens_total"):
                return float(line.split()[-1])
        return 0.0

    def close(self) -> None:
        self.process.terminate()
        self.process.communicate(timeout=60)


def timed(lm, task: str, folder: Path) -> tuple[float, dict]:
    """One lm-eval run of ``task`` with ``lm``: wall seconds (requests and scoring) and the results."""
    from lm_eval.evaluator import evaluate
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict([task], TaskManager(include_path=str(folder)))  # data loaded before the clock starts
    started = time.perf_counter()
    results = evaluate(lm=lm, task_dict=tasks, log_samples=True, verbosity="ERROR")
    return time.perf_counter() - started, results


def loglikelihoods(results: dict, task: str) -> list[float]:
    return [r[0][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]) for r in s["resps"]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--questions", type=int, default=24)
    parser.add_argument("--shots", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--concurrent", type=int, default=8)
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()

    import logging

    import torch
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lorakit.models import resolve

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="lm-eval-mc-"))
    task = build_task(work, args.questions, args.shots)
    os.chdir(work)  # lm-eval reads data_files relative to the working folder
    base = str(resolve(args.model))
    adapter = save_adapter(base, work / "adapter")
    hf = HFLM(pretrained=base, peft=str(adapter), dtype="float32", device="cpu", batch_size=args.hf_batch_size)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    answers: dict[str, dict] = {}
    hits = []
    for round_ in range(args.rounds):
        order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]
        for variant in order:
            if variant == "in-process hf":
                seconds, results = timed(hf, task, work)
            else:
                server = Server(base, adapter, args.threads, cache=variant == "served, prefix cache")
                try:
                    lm = LocalCompletionsAPI(model="bench", base_url=f"{server.url}/v1/completions",
                                             num_concurrent=args.concurrent, max_retries=1, timeout=3600)
                    seconds, results = timed(lm, task, work)
                    if variant == "served, prefix cache":
                        hits.append(server.hit_tokens())
                finally:
                    server.close()
            times[variant].append(seconds)
            answers[variant] = results
            print(f"round {round_ + 1}: {variant:22s} {seconds:7.1f} s  acc {results['results'][task]['acc,none']:.3f}",
                  flush=True)
    reference = loglikelihoods(answers["in-process hf"], task)
    worst = {v: max(abs(a - b) for a, b in zip(loglikelihoods(answers[v], task), reference)) for v in VARIANTS[:2]}
    same_acc = len({answers[v]["results"][task]["acc,none"] for v in VARIANTS}) == 1
    cache_vs_hf = statistics.median(c / h for c, h in zip(times["served, prefix cache"], times["in-process hf"]))
    speedup = statistics.median(n / c for n, c in zip(times["served, no cache"], times["served, prefix cache"]))
    requests = len(reference)
    print(f"\n{args.model}, {args.questions} questions x 4 choices = {requests} loglikelihood requests, "
          f"{args.shots}-shot, {args.threads} thread(s), {args.concurrent} concurrent, hf batch {args.hf_batch_size}")
    for variant in VARIANTS:
        print(f"  {variant:22s} median {statistics.median(times[variant]):7.1f} s "
              f"({requests / statistics.median(times[variant]):.1f} requests/s)")
    print(f"  prefix cache hits: {hits[-1]:.0f} prompt tokens in the last round")
    print(f"served with cache / in-process hf: {cache_vs_hf:.2f}x  (target <= 1.5)")
    print(f"served without cache / with cache: {speedup:.2f}x  (target >= 1.5)")
    print(f"same acc: {same_acc}; largest |loglikelihood - in-process|: "
          + ", ".join(f"{v} {w:.1e}" for v, w in worst.items()))
    ok = same_acc and all(w <= 1e-3 for w in worst.values())
    if args.json:
        Path(args.json).write_text(json.dumps({"times": times, "cache_vs_hf": cache_vs_hf, "speedup": speedup,
                                               "worst": worst, "same_acc": same_acc, "hits": hits}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
