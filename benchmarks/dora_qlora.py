"""DoRA and QLoRA against LoRA, lorakit and PEFT side by side, in one run.

    python benchmarks/dora_qlora.py dora  [--rounds 9] [--threads 1] [--dropout 0.05]
    python benchmarks/dora_qlora.py qlora [--steps 3] [--threads 2]
    python benchmarks/dora_qlora.py all   [--json FILE]

``dora``: a random-init Llama (hidden 512, 4 layers), r=16 on all linear layers, batch 4 × 256.
Step time (forward, backward, AdamW) of lorakit's DoRA ÷ lorakit's LoRA and PEFT's DoRA ÷ PEFT's
LoRA, interleaved round-robin in one process (median of per-round ratios); activation memory as
the bytes of the distinct tensors autograd saves for backward (what a step's peak adds to the
weights and optimizer state), and the step's peak = weights + adapter state + activations.

``qlora``: a random-init ~220 M-parameter Llama (hidden 1024, 16 layers; weights dominate memory),
one sequence of 128 tokens. Memory is the step's peak: tensors held between steps (weights with
their 4-bit statistics, adapters, optimizer state) plus the CPU allocator's peak during a step
(recorded by the profiler). Each variant runs in its own process:
lorakit LoRA (fp32 base), lorakit QLoRA (NF4 base), PEFT LoRA, PEFT QLoRA (transformers +
bitsandbytes 4-bit base). Reports the median step time and the peak resident memory, and the
ratios QLoRA ÷ LoRA for each library and lorakit ÷ PEFT. Variants run in alternating order twice.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

DORA_MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8)
QLORA_MODEL = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                   num_attention_heads=16, num_key_value_heads=16)


def _llama(spec: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(max_position_embeddings=512, **spec)).train()


def _adapted(library: str, dora: bool, dropout: float, model=None):
    model = model if model is not None else _llama(DORA_MODEL)
    kwargs = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout, use_dora=dora)
    if library == "peft":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**kwargs))
    import lorakit

    lorakit.add_adapter(model, lorakit.LoraConfig(**kwargs))
    return model


def _stepper(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def step():
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _saved_bytes(model, batch) -> int:
    """Bytes of the distinct storages autograd keeps between forward and backward."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def _state_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + 3 * trainable  # weights (adapters included) + gradients + two AdamW states


def run_dora(args) -> dict:
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, DORA_MODEL["vocab_size"], (4, 256), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    models = {f"{lib}-{kind}": _adapted(lib, kind == "dora", args.dropout)
              for lib in ("lorakit", "peft") for kind in ("lora", "dora")}
    memory = {}
    for name, model in models.items():
        saved = _saved_bytes(model, batch)
        memory[name] = {"activations": saved, "peak": saved + _state_bytes(model)}
    steps = {name: _stepper(model, batch) for name, model in models.items()}
    for step in steps.values():
        step()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(times[a], times[b]))
    result = {
        "threads": args.threads, "rounds": args.rounds, "dropout": args.dropout,
        "median_seconds": {n: statistics.median(t) for n, t in times.items()},
        "memory_bytes": memory,
        "lorakit_dora_over_lora_time": ratio("lorakit-dora", "lorakit-lora"),
        "peft_dora_over_lora_time": ratio("peft-dora", "peft-lora"),
        "lorakit_dora_over_peft_dora_time": ratio("lorakit-dora", "peft-dora"),
        "lorakit_dora_over_lora_peak": memory["lorakit-dora"]["peak"] / memory["lorakit-lora"]["peak"],
        "lorakit_dora_over_lora_activations":
            memory["lorakit-dora"]["activations"] / memory["lorakit-lora"]["activations"],
        "peft_dora_over_lora_peak": memory["peft-dora"]["peak"] / memory["peft-lora"]["peak"],
        "peft_dora_over_lora_activations": memory["peft-dora"]["activations"] / memory["peft-lora"]["activations"],
    }
    print(f"DoRA vs LoRA: batch 4x256, r=16 all-linear, dropout {args.dropout}, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    print(f"{'variant':<14}{'median s':>10}{'activations MiB':>17}{'peak MiB':>10}")
    for name in steps:
        print(f"{name:<14}{result['median_seconds'][name]:>10.3f}{memory[name]['activations'] / 2**20:>17.1f}"
              f"{memory[name]['peak'] / 2**20:>10.1f}")
    print(f"time  DoRA ÷ LoRA: lorakit {result['lorakit_dora_over_lora_time']:.3f}, "
          f"PEFT {result['peft_dora_over_lora_time']:.3f}; lorakit DoRA ÷ PEFT DoRA "
          f"{result['lorakit_dora_over_peft_dora_time']:.3f}")
    print(f"peak  DoRA ÷ LoRA: lorakit {result['lorakit_dora_over_lora_peak']:.3f}, "
          f"PEFT {result['peft_dora_over_lora_peak']:.3f}  (activations: lorakit "
          f"{result['lorakit_dora_over_lora_activations']:.3f}, PEFT {result['peft_dora_over_lora_activations']:.3f})")
    return result


# -- QLoRA: one process per variant ----------------------------------------------------------


def _qlora_child(variant: str, steps: int, threads: int, folder: str) -> dict:
    torch.set_num_threads(threads)
    library, kind = variant.split("-")
    if library == "peft" and kind == "qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.uint8)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").train()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).train()
        if kind == "qlora":
            from lorakit import quantize_model

            quantize_model(model)
    model = _adapted(library, False, 0.0, model)
    ids = torch.randint(0, QLORA_MODEL["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step()  # warm-up: optimizer state exists from here on
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    resident = _resident_bytes(model, optimizer)
    return {"seconds": statistics.median(times), "step_peak": resident + _allocation_peak(step),
            "resident": resident, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _resident_bytes(model, optimizer) -> int:
    """Bytes held between steps: parameters and buffers (4-bit codes and their quantisation
    statistics included) and the optimizer state."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, *( (state.state2.absmax, state.state2.code) if state.nested else ())):
                tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for values in optimizer.state.values():
        for t in values.values():
            if torch.is_tensor(t):
                tensors[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(tensors.values())


def _allocation_peak(step) -> int:
    """The highest amount allocated on top of what was live before ``step``, from the CPU
    allocator's events recorded by the profiler."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak


def run_qlora(args) -> dict:
    variants = ["lorakit-lora", "lorakit-qlora", "peft-lora", "peft-qlora"]
    with tempfile.TemporaryDirectory() as folder:
        _llama(QLORA_MODEL).save_pretrained(folder)
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for order in (variants, variants[::-1]):
            for variant in order:
                out = subprocess.run([sys.executable, __file__, "_child", variant, str(args.steps), str(args.threads),
                                      folder], capture_output=True, text=True, check=True)
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = {v: {key: statistics.median(r[key] for r in runs[v]) for key in runs[v][0]} for v in variants}
    params = sum(p.numel() for p in _llama(QLORA_MODEL).parameters())
    result = {
        "params": params, "steps": args.steps, "threads": args.threads, "runs": runs, "summary": summary,
        "lorakit_qlora_over_lora_time": summary["lorakit-qlora"]["seconds"] / summary["lorakit-lora"]["seconds"],
        "lorakit_qlora_over_lora_memory": summary["lorakit-qlora"]["step_peak"] / summary["lorakit-lora"]["step_peak"],
        "peft_qlora_over_lora_time": summary["peft-qlora"]["seconds"] / summary["peft-lora"]["seconds"],
        "peft_qlora_over_lora_memory": summary["peft-qlora"]["step_peak"] / summary["peft-lora"]["step_peak"],
        "lorakit_over_peft_qlora_time": summary["lorakit-qlora"]["seconds"] / summary["peft-qlora"]["seconds"],
        "lorakit_over_peft_qlora_memory": summary["lorakit-qlora"]["step_peak"] / summary["peft-qlora"]["step_peak"],
    }
    print(f"QLoRA vs LoRA: random-init Llama {params / 1e6:.0f} M params, 1 x 128 tokens, r=16 all-linear, "
          f"{args.threads} thread(s), median of {args.steps} steps, 2 runs per variant")
    print(f"{'variant':<15}{'step s':>9}{'step peak MiB':>15}{'held MiB':>10}{'process RSS MiB':>17}")
    for v in variants:
        row = summary[v]
        print(f"{v:<15}{row['seconds']:>9.2f}{row['step_peak'] / 2**20:>15.0f}{row['resident'] / 2**20:>10.0f}"
              f"{row['peak_rss'] / 2**20:>17.0f}")
    print("(step peak = tensors held between steps + the allocator's peak during a step; process RSS also "
          "counts loading the fp32 checkpoint before quantising)")
    print(f"QLoRA ÷ LoRA: lorakit time {result['lorakit_qlora_over_lora_time']:.2f}, memory "
          f"{result['lorakit_qlora_over_lora_memory']:.2f}; PEFT time {result['peft_qlora_over_lora_time']:.2f}, "
          f"memory {result['peft_qlora_over_lora_memory']:.2f}")
    print(f"lorakit QLoRA ÷ PEFT QLoRA: time {result['lorakit_over_peft_qlora_time']:.2f}, memory "
          f"{result['lorakit_over_peft_qlora_memory']:.2f}")
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        variant, steps, threads, folder = sys.argv[2:6]
        print(json.dumps(_qlora_child(variant, int(steps), int(threads), folder)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["dora", "qlora", "all"])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="default: 1 for dora, 2 for qlora")
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {}
    if args.what in ("dora", "all"):
        results["dora"] = run_dora(argparse.Namespace(**{**vars(args), "threads": args.threads or 1}))
    if args.what in ("qlora", "all"):
        results["qlora"] = run_qlora(argparse.Namespace(**{**vars(args), "threads": args.threads or 2}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
