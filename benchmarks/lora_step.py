"""LoRA training-step time: lorakit vs PEFT vs the frozen-base floor, interleaved in one process.

    python benchmarks/lora_step.py [--rounds 9] [--threads 1] [--dropout 0.05] [--json FILE]

A random-init Llama (hidden 512, 4 layers, vocab 8192), LoRA r=16 on all linear layers, one padded
batch of 4 × 256 tokens. Each round times, in turn:

- ``forward``: a no-grad forward (the unit every ratio is given in);
- ``floor``: forward + input gradients through a frozen base with no adapter (the least a
  frozen-base method can cost: REFERENCE.md "LoRA math");
- ``peft``: PEFT's LoRA step (forward, backward, AdamW step);
- ``lorakit``: ours, same config, same batch, same optimiser.

Variants run round-robin and the median of per-round ratios is reported (REFERENCE.md "Measuring
speed on these machines"). ``--threads 1`` gives the steadiest ratios on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    return LlamaForCausalLM(config).train()


def make_variants(dropout: float, batch: dict) -> dict:
    import peft

    import lorakit

    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout)
    frozen = build_model()
    frozen.requires_grad_(False)
    frozen.get_input_embeddings().weight.requires_grad_(True)  # something must need a gradient
    peft_model = peft.get_peft_model(build_model(), peft.LoraConfig(**lora))
    ours = build_model()
    lorakit.add_adapter(ours, lorakit.LoraConfig(**lora))

    def step_fn(model):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def step():
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def floor():
        frozen(**batch).loss.backward()
        frozen.get_input_embeddings().weight.grad = None

    def forward():
        with torch.no_grad():
            ours(**batch)

    return {"forward": forward, "floor": floor, "peft": step_fn(peft_model), "lorakit": step_fn(ours)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    variants = make_variants(args.dropout, batch)
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    ratio = {name: statistics.median(t / f for t, f in zip(times[name], times["forward"])) for name in variants}
    result = {
        "threads": args.threads, "rounds": args.rounds, "dropout": args.dropout,
        "batch": f"{args.batch}x{args.seq}",
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "step_over_forward": ratio,
        "lorakit_over_peft": statistics.median(a / b for a, b in zip(times["lorakit"], times["peft"])),
        "lorakit_over_floor": statistics.median(a / b for a, b in zip(times["lorakit"], times["floor"])),
    }
    print(f"batch {result['batch']}, dropout {args.dropout}, {args.threads} thread(s), {args.rounds} rounds")
    print(f"{'variant':<10}{'median s':>10}{'÷ forward':>11}")
    for name in variants:
        print(f"{name:<10}{result['median_seconds'][name]:>10.3f}{ratio[name]:>11.2f}")
    print(f"lorakit ÷ PEFT  {result['lorakit_over_peft']:.3f}   lorakit ÷ floor  {result['lorakit_over_floor']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
