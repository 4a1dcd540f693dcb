"""Mixed-adapter generation: lorakit's engine vs PEFT's ``adapter_names`` path vs the base model.

    python benchmarks/serve_engine.py [--model smollm2-135m-instruct] [--rounds 3] [--threads 1] \
        [--requests 32] [--new-tokens 32] [--adapters 1,8,32] [--rank 16] [--targets all-linear] \
        [--json FILE]

One process, variants interleaved round-robin, median of per-round ratios (REFERENCE.md, "Measuring
speed on these machines"). Every variant generates ``--new-tokens`` tokens for the
same ``--requests`` chat prompts (end-of-sequence suppressed until then: ``min_tokens`` /
``min_new_tokens``); request ``i`` uses adapter ``i mod k``. Adapters are random
(non-zero A and B) PEFT-format folders of rank ``--rank`` on ``--targets``, written to a temporary
folder.

Variants, per round:

- ``engine base``: lorakit's engine, every request on the base model (the unit for ``engine k``);
- ``engine k``: the engine, k distinct adapters in the batch (grouped LoRA, the default);
- ``gather k``: the same with per-row gathered adapter weights (the alternative layer strategy);
- ``spread 8``: 8 adapters whose slots are spread over 64 resident adapters (gathered, not
  sliced) — the cost of a large resident set, compared with ``engine 8`` (8 adjacent slots);
- ``hf base``: transformers' ``generate`` on the plain base model, same left-padded batch (the
  unit for ``peft k``);
- ``peft k``: PEFT's mixed batch, ``generate(..., adapter_names=[...])``;
- ``one by one``: the engine serving 4 of the requests one at a time, scaled to all of them.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

QUESTIONS = [
    "What is the capital of {}?", "Write one sentence about {}.", "Define the word '{}'.",
    "Give a synonym of '{}'.", "Translate '{}' into French.", "Is {} a noun or a verb?",
    "Spell '{}' backwards.", "Use '{}' in a question.",
]
WORDS = ["France", "rain", "able", "river", "light", "garden", "Peru", "music"]


def chat_prompts(tokenizer, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = QUESTIONS[i % len(QUESTIONS)].format(WORDS[(i // len(QUESTIONS) + i) % len(WORDS)])
        templ = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=False)
        out.append(tokenizer(templ, add_special_tokens=False)["input_ids"])
    return out


def write_adapters(model, root: Path, count: int, rank: int, targets) -> list[Path]:
    """``count`` random PEFT-format adapters for ``model`` (written directly: no model copies)."""
    from safetensors.torch import save_file

    from lorakit import LoraConfig
    from lorakit.inject import find_targets

    modules = find_targets(model, LoraConfig(target_modules=targets))
    folders = []
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        tensors = {}
        for name in modules:
            layer = model.get_submodule(name)
            out_f, in_f = layer.weight.shape
            tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.rand(rank, in_f, generator=g) * 2 - 1) / in_f ** 0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.rand(out_f, rank, generator=g) * 2 - 1) * 0.02
        folder = root / f"a{i}"
        folder.mkdir(parents=True)
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
                            task_type="CAUSAL_LM")
        (folder / "adapter_config.json").write_text(config.to_json())
        folders.append(folder)
    return folders


def build(args, root: Path):
    import peft

    from lorakit.models import load_model, load_tokenizer
    from lorakit.serve import Engine

    tokenizer = load_tokenizer(args.model)
    tokenizer.padding_side = "left"
    base = load_model(args.model, dtype=torch.float32, device="cpu")
    folders = write_adapters(base, root, 64, args.rank, args.targets)
    engine = Engine(load_model(args.model, dtype=torch.float32, device="cpu"), tokenizer,
                    max_batch=max(64, args.requests), max_resident=64, max_rank=args.rank, target_modules=args.targets)
    for i, folder in enumerate(folders):
        engine.load_adapter(f"a{i}", folder)
    for i in range(64):  # make all 64 resident, a0 in slot 0 … a63 in slot 63
        engine.registry.release(engine.registry.acquire(f"a{i}"))
    k_max = max(args.adapters)
    peft_model = peft.PeftModel.from_pretrained(load_model(args.model, dtype=torch.float32, device="cpu"),
                                                str(folders[0]), adapter_name="a0")
    for i in range(1, k_max):
        peft_model.load_adapter(str(folders[i]), adapter_name=f"a{i}")
    peft_model.eval()
    return tokenizer, base, engine, peft_model


def make_variants(args, tokenizer, base, engine, peft_model) -> dict:
    from lorakit.serve import SamplingParams

    prompts = chat_prompts(tokenizer, args.requests)
    # min_tokens = min_new_tokens in generate: EOS is suppressed the same way on both sides
    params = SamplingParams(max_tokens=args.new_tokens, min_tokens=args.new_tokens, temperature=0)
    padded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")

    def run_engine(names, strategy="grouped", subset=None):
        def fn():
            engine.strategy = strategy
            todo = list(zip(prompts, names))[: subset or len(prompts)]
            if subset:  # one at a time
                for p, a in todo:
                    engine.submit(prompt_ids=p, adapter=a, params=params).result()
            else:
                handles = [engine.submit(prompt_ids=p, adapter=a, params=params) for p, a in todo]
                for h in handles:
                    assert h.result().completion_tokens == args.new_tokens
            engine.strategy = "grouped"
        return fn

    def run_hf(model, names=None):
        def fn():
            extra = {"adapter_names": names} if names is not None else {}
            with torch.no_grad():
                out = model.generate(**padded, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.pad_token_id, **extra)
            assert out.shape[1] == padded["input_ids"].shape[1] + args.new_tokens
        return fn

    n = args.requests
    variants = {"engine base": run_engine([None] * n)}
    for k in args.adapters:
        variants[f"engine {k}"] = run_engine([f"a{i % k}" for i in range(n)])
    for k in args.adapters:
        if k > 1:
            variants[f"gather {k}"] = run_engine([f"a{i % k}" for i in range(n)], strategy="gather")
    variants["spread 8"] = run_engine([f"a{(i % 8) * 8}" for i in range(n)])
    variants["hf base"] = run_hf(base)
    for k in args.adapters:
        variants[f"peft {k}"] = run_hf(peft_model, [f"a{i % k}" for i in range(n)])
    variants["one by one"] = run_engine([f"a{i % max(args.adapters)}" for i in range(n)], subset=args.one_by_one)
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", default="1,8,32", help="distinct adapters per batch, comma-separated")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="all-linear", help="all-linear or comma-separated module names")
    parser.add_argument("--one-by-one", type=int, default=4, help="requests served one at a time (scaled up)")
    parser.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    args.adapters = [int(k) for k in args.adapters.split(",")]
    if args.targets != "all-linear":
        args.targets = args.targets.split(",")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, base, engine, peft_model = build(args, Path(tmp))
        variants = make_variants(args, tokenizer, base, engine, peft_model)
        if args.only:
            keep = set(args.only.split(",")) | {"engine base", "hf base"}
            variants = {k: v for k, v in variants.items() if k in keep}
        for fn in variants.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name in order:
                gc.collect()
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {times[n][-1]:.1f}s" for n in variants), flush=True)
    scale = args.requests / args.one_by_one
    if "one by one" in times:
        times["one by one"] = [t * scale for t in times["one by one"]]

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    unit = {name: ("hf base" if name.startswith(("peft", "hf")) else "engine base") for name in times}
    result = {
        "model": args.model, "threads": args.threads, "rounds": args.rounds, "requests": args.requests,
        "new_tokens": args.new_tokens, "rank": args.rank, "targets": args.targets,
        "torch": torch.__version__,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "over_base": {name: ratio(name, unit[name]) for name in times},
        "engine_base_over_hf_base": ratio("engine base", "hf base"),
        "engine_over_peft": {k: ratio(f"engine {k}", f"peft {k}") for k in args.adapters
                             if f"engine {k}" in times and f"peft {k}" in times},
        "per_round_seconds": times,
    }
    if "one by one" in times:
        k = max(args.adapters)
        result["one_by_one_over_engine"] = ratio("one by one", f"engine {k}")
    print(f"{args.model}: {args.requests} requests x {args.new_tokens} new tokens, LoRA r={args.rank} on "
          f"{args.targets}, {args.threads} thread(s), {args.rounds} rounds (median of per-round ratios)")
    print(f"{'variant':<14}{'median s':>10}{'tok/s':>9}{'÷ base':>9}  unit")
    for name in times:
        tokens = args.requests * args.new_tokens
        seconds = result["median_seconds"][name]
        print(f"{name:<14}{seconds:>10.2f}{tokens / seconds:>9.0f}{result['over_base'][name]:>9.2f}  {unit[name]}")
    print(f"engine base ÷ hf base: {result['engine_base_over_hf_base']:.2f}")
    for k, v in result["engine_over_peft"].items():
        print(f"engine ÷ peft, {k} adapter(s): {v:.2f}")
    if "one_by_one_over_engine" in result:
        print(f"one by one ÷ engine {max(args.adapters)}: {result['one_by_one_over_engine']:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
