"""Peak memory of a LoRA training step: the chunked loss against the model's own (plain) loss.

    python benchmarks/chunked_loss.py [--vocab 49152,128256] [--seq 2048] [--hidden 256] [--layers 2] \
        [--prompt 0.0,0.5] [--threads 2] [--json FILE]

A random-init Llama (hidden 256, 2 layers, untied head) with the given vocabulary sizes, LoRA r=16
on all linear layers, one sequence of ``--seq`` tokens. For each vocabulary and each prompt share
(the fraction of the row whose labels are -100, as in chat data; 0.0 = every token is a target),
one training step (forward, backward, AdamW) with:

- ``plain``: ``model(**batch).loss`` — transformers materialises the (tokens × vocab) logits,
  upcasts them to fp32 and keeps what cross-entropy's backward needs;
- ``chunked``: ``lorakit.train.loss.CausalLMLoss`` (what ``lorakit train`` runs): the head and the
  loss in chunks over the target positions only.

"Peak" is the most memory the CPU allocator held during the step above what was live before it
(weights, adapters), from the profiler's allocation events (the same probe as
``tests/memory_probe.py``); the loss of both variants is printed to show they agree. A small
hidden size keeps the step short while the logits (which scale with tokens × vocab, not with the
model) dominate; with a wide model the activations grow and the ratio moves towards 1, but the
saving in bytes stays the same. Run time ≈ 1–2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from memory_probe import peak_allocated  # noqa: E402  (the memory tests' measure)


def build(vocab: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=8192,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).train()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  lora_dropout=0.05))
    return model


def measure(model, loss_fn, batch) -> tuple[int, float, float]:
    """(peak bytes, loss, seconds) of one training step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: the weights stay as they are for the next variant
    torch.manual_seed(1)
    loss_fn(**batch).backward()  # warm-up (and AdamW state created below, outside the measurement)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = loss_fn(**batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return peak_allocated(prof), float(loss.detach()), time.perf_counter() - start


def main() -> None:
    from lorakit.train.loss import CausalLMLoss, default_chunk

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="49152,128256")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", default="0.0,0.5", help="prompt shares to measure (labels -100)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"seq {args.seq}, hidden {args.hidden}, {args.layers} layers, LoRA r=16 all-linear, dropout 0.05, fp32 CPU")
    print(f"{'vocab':>7}{'prompt':>8}{'chunk':>7}{'plain MiB':>11}{'chunked MiB':>13}{'ratio':>7}"
          f"{'plain loss':>12}{'chunked loss':>14}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        model = build(vocab, args.hidden, args.layers)
        ids = torch.randint(0, vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
        for share in (float(s) for s in args.prompt.split(",")):
            labels = ids.clone()
            labels[:, : int(share * args.seq)] = -100
            batch = {"input_ids": ids, "labels": labels}
            plain = measure(model, lambda **b: model(**b, use_cache=False).loss, batch)
            chunked = measure(model, CausalLMLoss(model), batch)
            row = {"vocab": vocab, "prompt_share": share, "chunk": default_chunk(vocab),
                   "plain_peak": plain[0], "chunked_peak": chunked[0], "ratio": chunked[0] / plain[0],
                   "plain_loss": plain[1], "chunked_loss": chunked[1], "plain_s": plain[2], "chunked_s": chunked[2]}
            rows.append(row)
            print(f"{vocab:>7}{share:>8.2f}{row['chunk']:>7}{plain[0] / 2**20:>11.0f}{chunked[0] / 2**20:>13.0f}"
                  f"{row['ratio']:>7.2f}{plain[1]:>12.5f}{chunked[1]:>14.5f}")
        model = None  # free it before the next vocabulary's model (the lambda above closes over it)
    print("load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "load_average": os.getloadavg()}, f, indent=2)


if __name__ == "__main__":
    main()
