"""LoRA training on one CUDA GPU: lorakit vs PEFT vs the frozen-base floor, and QLoRA beside them.

    python benchmarks/gpu_bench.py [--layers 22] [--batch 4] [--seq 2048] [--steps 10] [--warmup 3] \
        [--variants floor,peft,lorakit,lorakit-compile,lorakit-ckpt,qlora] [--peak-tflops 790] [--json FILE]

(``benchmarks/gpu.sh`` runs it with the defaults; under 8 minutes on an H200.)

Model: a random-init ~1.1 B Llama (TinyLlama's shape: hidden 2048, intermediate 5632, 22 layers,
32 heads, 4 KV heads, vocab 32000), bf16 weights, SDPA attention, batch 4 × 2048 tokens (every
token a target). LoRA r=16, alpha 32, dropout 0.05 on all linear layers (adapters fp32), AdamW
(fused) lr 1e-4, every step under ``torch.autocast(bf16)`` as ``lorakit train`` and the HF Trainer
(``bf16=True``) run it. Each variant builds its own model, runs ``--warmup`` steps, then times
``--steps`` steps (CUDA-synchronised), and frees everything before the next:

- ``floor``: the frozen model, no adapter, ``model(**batch).loss`` backward down to the embedding
  output (forward + input gradients: the least any frozen-base method can cost);
- ``peft``: PEFT's LoRA, ``model(**batch).loss``;
- ``lorakit``: lorakit's LoRA through ``CausalLMLoss`` (fused LoRA layers + chunked loss), what
  ``lorakit train`` runs;
- ``lorakit-compile``: the same with every decoder layer ``torch.compile``-d (``train.compile``);
- ``lorakit-ckpt``: the same with gradient checkpointing (memory, at a time cost);
- ``qlora``: lorakit's LoRA over an NF4 base (``adapter.method: qlora``).

Printed per variant: tokens/s, step time, peak GPU memory (``max_memory_allocated`` over the timed
steps), and model FLOP utilisation against ``--peak-tflops`` (H200 dense bf16: 790 — the number
NVIDIA quotes *without* sparsity is 989 for SXM at its highest clock; we use the issue's 790).
Model FLOPs per token of a frozen-base step = forward (2N) + input gradient (2N) over the N
matmul weights (all linear layers and the head), plus attention 12·L·d·T (PaLM's convention for
forward and backward of QKᵀ and AV, causal masking not discounted); LoRA's own FLOPs are not
counted, so MFU is the floor's work per second — comparable across variants.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
              num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, attn_implementation="sdpa", **CONFIG)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    return model.train()


def model_flops_per_token(model, seq: int) -> float:
    """4N (forward + input gradient of the matmuls) + 12·L·d·T (attention), per token."""
    config = model.config
    d, L = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    matmul = L * per_layer + d * config.vocab_size  # + the head
    return 4 * matmul + 12 * L * d * seq


def make(variant: str, layers: int):
    """(model, loss function taking the batch, trainable parameters) for one variant."""
    import lorakit
    from lorakit.train.loss import CausalLMLoss

    model = build(layers)
    if variant == "floor":
        model.requires_grad_(False)
        # Input gradients through every layer, down to the embedding output (no embedding-weight gradient).
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_())
        return model, lambda **b: model(**b).loss, []
    if variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**LORA))
        return model, lambda **b: model(**b).loss, [p for p in model.parameters() if p.requires_grad]
    if variant == "qlora":
        from lorakit.adapters.quant import quantize_model

        quantize_model(model, compute_dtype=torch.bfloat16)
    lorakit.add_adapter(model, lorakit.LoraConfig(**LORA))
    if variant == "lorakit-compile":
        from lorakit.train.setup import compile_blocks

        compile_blocks(model)
    if variant == "lorakit-ckpt":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    objective = CausalLMLoss(model)
    return model, objective, [p for p in model.parameters() if p.requires_grad]


def run(variant: str, args, batch) -> dict:
    model, loss_fn, params = make(variant, args.layers)
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(**batch)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss

    started = time.perf_counter()
    for _ in range(args.warmup):
        loss = step()
    torch.cuda.synchronize()
    warmup_s = time.perf_counter() - started
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        loss = step()
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / args.steps
    tokens = batch["input_ids"].numel()
    result = {"variant": variant, "step_s": seconds, "tokens_per_s": tokens / seconds,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "loss": float(loss), "warmup_s": warmup_s,
              "mfu": tokens / seconds * model_flops_per_token(model, args.seq) / (args.peak_tflops * 1e12)}
    model = loss_fn = params = optimizer = loss = step = None  # free them (step closes over loss_fn, optimizer)
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="floor,peft,lorakit,lorakit-compile,lorakit-ckpt,qlora")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA GPU and a CUDA build of torch")
    torch.backends.cuda.matmul.allow_tf32 = True
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.seq), device="cuda",
                        generator=torch.Generator("cuda").manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; Llama {args.layers} layers (TinyLlama shape), "
          f"bf16, batch {args.batch} × {args.seq}, LoRA r=16 all-linear, dropout 0.05", flush=True)
    results = []
    for variant in args.variants.split(","):
        try:
            results.append(run(variant, args, batch))
        except Exception as err:  # one failing variant (e.g. no bitsandbytes CUDA build) must not hide the rest
            print(f"{variant}: failed: {type(err).__name__}: {err}", flush=True)
            gc.collect()
            torch.cuda.empty_cache()
            continue
        r = results[-1]
        print(f"{variant:<16} {r['tokens_per_s']:>9.0f} tok/s  {r['step_s'] * 1000:>7.1f} ms/step  "
              f"peak {r['peak_gib']:>6.2f} GiB  MFU {100 * r['mfu']:>5.1f} %  loss {r['loss']:.4f}  "
              f"(warm-up {r['warmup_s']:.1f} s)", flush=True)
    by = {r["variant"]: r for r in results}
    if "lorakit" in by:
        ours = by["lorakit"]
        for other in ("peft", "floor"):
            if other in by:
                print(f"lorakit ÷ {other}: step time {ours['step_s'] / by[other]['step_s']:.3f}, "
                      f"peak memory {ours['peak_gib'] / by[other]['peak_gib']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "device": torch.cuda.get_device_name(),
                       "host_load": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
