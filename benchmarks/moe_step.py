"""A LoRA training step on mixture-of-experts layers: lorakit vs PEFT's target_parameters vs the floor.

    python benchmarks/moe_step.py [--shape qwen3-30b-a3b|small] [--layers 2] [--batch 1] [--seq 256]
                                  [--rank 16] [--rounds 7] [--threads 1] [--dtype bf16|fp32] [--json FILE]

The layer shape of a real MoE model — ``qwen3-30b-a3b`` (default): hidden 2048, 128 experts, top-8,
expert size 768, 32 heads / 4 KV heads of 128 — stacked ``--layers`` times in a random-init
``Qwen3MoeForCausalLM`` with a small vocabulary (2048), base weights in ``--dtype``. LoRA r=16,
alpha 32 on both expert weights (``target_parameters=["mlp.experts.gate_up_proj",
"mlp.experts.down_proj"]``), one batch of ``--batch × --seq`` tokens, every token a target. The
three variants share one copy of the frozen base weights. Each round times, in turn:

- ``floor``: forward + input gradients through the frozen base, no adapter, transformers' own
  ``grouped_mm`` experts (the least any frozen-base method can cost);
- ``peft``: PEFT 0.21.2's step (forward, backward, AdamW) — it parametrises each 3-D weight,
  forming ``W + ΔW`` for all 128 experts at every forward and its gradient in backward;
- ``lorakit``: ours — the rank-r path on each expert's routed tokens only (lorakit's experts
  implementation), same batch, same optimiser.

With ``--dtype bf16`` every variant runs under ``torch.autocast(bf16)``, as ``lorakit train`` (and
transformers' Trainer with ``bf16=True``) runs a bf16 model; the optimiser is the fused AdamW that
``lorakit train`` uses, for both adapters.

Times: median of per-round ratios over interleaved rounds (REFERENCE.md "Measuring speed on these
machines"). Memory: the *step peak* is one more step of each, alone, above what was live before it
(CPU: the profiler's allocation events, as ``tests/memory_probe.py``; CUDA: the allocator's peak);
the *total* adds what each variant holds on its own (base weights, adapters, AdamW's moments), i.e.
its peak if it ran alone. The targets of issue #18: lorakit ≤ 0.5× PEFT's time, ≤ 0.7× its total
peak memory, ≤ 1.15× the floor's time.

Run time on a quiet 2-core CPU, 1 thread, defaults: ≈ 3 minutes; needs ≈ 6 GB of memory (bf16).
On a CUDA machine it runs there (``--device cuda``, the default when one is present).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from memory_probe import peak_allocated  # noqa: E402  (the memory tests' measure)

SHAPES = {
    "qwen3-30b-a3b": dict(hidden_size=2048, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                          intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4, head_dim=128),
    "small": dict(hidden_size=512, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
                  intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=64),
}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(shape: str, layers: int, dtype: torch.dtype, device: str, like: torch.nn.Module | None = None):
    """A Qwen3-MoE stack; with ``like``, one that shares ``like``'s weight tensors (no second copy)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=2048, num_hidden_layers=layers, max_position_embeddings=4096,
                            norm_topk_prob=True, **SHAPES[shape])
    if like is None:
        torch.manual_seed(0)
        with torch.device(device):
            return Qwen3MoeForCausalLM(config).to(dtype).train().requires_grad_(False)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model.load_state_dict(like.state_dict(), assign=True)
    for name, buffer in like.named_buffers():  # non-persistent buffers (rotary inv_freq) are not in the state dict
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner).register_buffer(attr, buffer, persistent=False)
    return model.to(dtype).train().requires_grad_(False)


def make_variants(args, batch: dict) -> dict:
    import peft

    import lorakit

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    floor_model = build(args.shape, args.layers, dtype, args.device)
    # Input gradients through every layer, down to the embedding output (no embedding-weight gradient).
    floor_model.get_input_embeddings().register_forward_hook(lambda module, inputs, out: out.requires_grad_())
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=[], target_parameters=TARGETS)
    peft_model = peft.get_peft_model(build(args.shape, args.layers, dtype, args.device, like=floor_model),
                                     peft.LoraConfig(**lora))
    ours = build(args.shape, args.layers, dtype, args.device, like=floor_model)
    lorakit.add_adapter(ours, lorakit.LoraConfig(**lora))

    def autocast():  # bf16 as lorakit train runs it (and transformers' Trainer with bf16=True): autocast
        return torch.autocast(args.device, dtype=dtype, enabled=dtype != torch.float32)

    def step_fn(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)  # lorakit train's optimizer, for both

        def step():
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def floor():
        with autocast():
            loss = floor_model(**batch).loss
        loss.backward()

    variants = {"floor": floor, "peft": step_fn(peft_model), "lorakit": step_fn(ours)}
    models = {"floor": floor_model, "peft": peft_model, "lorakit": ours}
    return variants, models


def resident_bytes(model: torch.nn.Module, optimizer_params: int) -> int:
    """Weights (each tensor once) plus AdamW's two fp32 moments of the trained parameters."""
    weights = sum(p.nbytes for p in {id(p): p for p in model.parameters()}.values())
    return weights + 2 * 4 * optimizer_params


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_bytes(fn, device: str) -> int:
    """Peak memory one call of ``fn`` allocates above what was live before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return peak_allocated(prof)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 2048, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    batch = {"input_ids": ids, "labels": ids}
    variants, models = make_variants(args, batch)
    for fn in variants.values():  # warm-up (AdamW state, lazily built kernels)
        fn()
    synchronize(args.device)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            synchronize(args.device)
            start = time.perf_counter()
            fn()
            synchronize(args.device)
            times[name].append(time.perf_counter() - start)
    peaks = {name: peak_bytes(fn, args.device) for name, fn in variants.items()}
    trained = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()}
    # Each variant on its own: base weights + adapters + AdamW state + the step's peak.
    totals = {name: resident_bytes(models[name], trained[name]) + peaks[name] for name in variants}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))  # noqa: E731
    result = {
        "shape": args.shape, "layers": args.layers, "tokens": f"{args.batch}x{args.seq}", "rank": args.rank,
        "dtype": args.dtype, "device": args.device, "threads": args.threads, "rounds": args.rounds,
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "step_peak_bytes": peaks,
        "total_peak_bytes": totals,
        "trained_parameters": trained,
        "lorakit_over_peft_time": per_round("lorakit", "peft"),
        "lorakit_over_floor_time": per_round("lorakit", "floor"),
        "peft_over_floor_time": per_round("peft", "floor"),
        "lorakit_over_peft_memory": totals["lorakit"] / totals["peft"],
        "lorakit_over_peft_step_memory": peaks["lorakit"] / peaks["peft"],
        "load_average": os.getloadavg(),
    }
    print(f"{args.shape}: {args.layers} layers, {result['tokens']} tokens, r={args.rank}, {args.dtype} on "
          f"{args.device}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"{'variant':<10}{'median s':>10}{'step peak MiB':>15}{'total MiB':>11}")
    for name in variants:
        print(f"{name:<10}{result['median_seconds'][name]:>10.3f}{peaks[name] / 2**20:>15.1f}"
              f"{totals[name] / 2**20:>11.1f}")
    print(f"lorakit ÷ PEFT time {result['lorakit_over_peft_time']:.3f} (target ≤ 0.5)   "
          f"memory {result['lorakit_over_peft_memory']:.3f} (≤ 0.7; step alone "
          f"{result['lorakit_over_peft_step_memory']:.3f})   "
          f"lorakit ÷ floor time {result['lorakit_over_floor_time']:.3f} (≤ 1.15)   "
          f"PEFT ÷ floor {result['peft_over_floor_time']:.2f}")
    print("load average at the end: " + ", ".join(f"{x:.2f}" for x in result["load_average"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
