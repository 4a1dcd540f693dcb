"""LoRA training-step time: lorakit vs PEFT vs the frozen-base floor, interleaved in one process.

    python benchmarks/lora_step.py [--shape small|1b-layer] [--rounds 9] [--threads 1] [--dropout 0.05]
                                   [--batch 4] [--seq 256] [--json FILE]

A random-init Llama, LoRA r=16 on all linear layers, one right-padded batch (row i is i/16 shorter
than the longest; every real token is a target). Two shapes:

- ``small`` (default): hidden 512, intermediate 1376, 4 layers, vocab 8192. At this width LoRA's
  own FLOPs are ~3r/d ≈ 9 % of the base matmuls, so no LoRA can come within 5 % of the floor.
- ``1b-layer``: the layer shape of a 1.1 B Llama (TinyLlama: hidden 2048, intermediate 5632, 32
  heads, 4 KV heads), 2 layers, vocab 8192 — a realistic width (LoRA ≈ 2 % of the base FLOPs)
  with few layers so a CPU round takes seconds.

Each round times, in turn:

- ``forward``: a no-grad forward (the unit every ratio is given in);
- ``floor``: forward + input gradients through a frozen base with no adapter (the least a
  frozen-base method can cost: REFERENCE.md "LoRA math");
- ``peft``: PEFT's LoRA step (forward, backward, AdamW step) on ``model(**batch).loss``;
- ``lorakit``: ours as ``lorakit train`` runs it (fused LoRA layers, the chunked loss
  ``CausalLMLoss``), same config, same batch, same optimiser;
- ``lorakit-modelloss``: ours with the model's own loss (isolates the LoRA layers).

Variants run round-robin and the median of per-round ratios is reported (REFERENCE.md "Measuring
speed on these machines"). ``--threads 1`` gives the steadiest ratios on a shared 2-core machine.
Run time (quiet 2-core machine, 1 thread): ``small`` 9 rounds ≈ 1.5 min; ``1b-layer`` with
``--batch 2 --rounds 7`` ≈ 1.5 min.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


SHAPES = {
    "small": dict(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=8),
    "1b-layer": dict(vocab_size=8192, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                     num_attention_heads=32, num_key_value_heads=4),
}


def build_model(shape: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    return LlamaForCausalLM(config).train()


def make_variants(shape: str, dropout: float, batch: dict) -> dict:
    import peft

    import lorakit
    from lorakit.train.loss import CausalLMLoss

    lora = dict(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=dropout)
    frozen = build_model(shape)
    frozen.requires_grad_(False)
    # Input gradients through every layer, down to the embedding output (no embedding-weight gradient).
    frozen.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
    peft_model = peft.get_peft_model(build_model(shape), peft.LoraConfig(**lora))
    ours = build_model(shape)
    lorakit.add_adapter(ours, lorakit.LoraConfig(**lora))
    objective = CausalLMLoss(ours)

    def step_fn(model, loss_fn):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def step():
            loss = loss_fn(**batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    def floor():
        frozen(**batch).loss.backward()

    def forward():
        with torch.no_grad():
            ours(**batch)

    return {"forward": forward, "floor": floor, "peft": step_fn(peft_model, lambda **b: peft_model(**b).loss),
            "lorakit": step_fn(ours, objective), "lorakit-modelloss": step_fn(ours, lambda **b: ours(**b).loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, 8192, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    # A padded batch: row i is 1/16 × i shorter than the longest (right padding, no loss there).
    lengths = torch.tensor([args.seq - i * args.seq // 16 for i in range(args.batch)])
    mask = (torch.arange(args.seq)[None] < lengths[:, None]).long()
    batch = {"input_ids": ids * mask, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}
    variants = make_variants(args.shape, args.dropout, batch)
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
        "shape": args.shape, "threads": args.threads, "rounds": args.rounds, "dropout": args.dropout,
        "batch": f"{args.batch}x{args.seq}",
        "median_seconds": {name: statistics.median(t) for name, t in times.items()},
        "step_over_forward": ratio,
        "lorakit_over_peft": statistics.median(a / b for a, b in zip(times["lorakit"], times["peft"])),
        "lorakit_over_floor": statistics.median(a / b for a, b in zip(times["lorakit"], times["floor"])),
        "modelloss_over_peft": statistics.median(a / b for a, b in zip(times["lorakit-modelloss"], times["peft"])),
        "load_average": os.getloadavg(),
    }
    print(f"shape {args.shape}, batch {result['batch']}, dropout {args.dropout}, {args.threads} thread(s), "
          f"{args.rounds} rounds")
    print(f"{'variant':<19}{'median s':>10}{'÷ forward':>11}")
    for name in variants:
        print(f"{name:<19}{result['median_seconds'][name]:>10.3f}{ratio[name]:>11.2f}")
    print(f"lorakit ÷ PEFT  {result['lorakit_over_peft']:.3f}   "
          f"lorakit ÷ floor  {result['lorakit_over_floor']:.3f}   (model loss) ÷ PEFT  {result['modelloss_over_peft']:.3f}")
    print("load average at the end: " + ", ".join(f"{x:.2f}" for x in result["load_average"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
