"""``lorakit estimate M --method …``: will this training run fit in GPU memory?

Reads only the model's config (no weights), prints the peak memory of one training step by part,
compares it with ``--gpu`` and, when it does not fit, lists changes that would, with new totals.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from lorakit.commands.flags import dropout, percent, positive_int

CUDA_RESERVE = 3 << 28  # 0.75 GiB: CUDA context, cuBLAS workspace and allocator slack, not in the plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="M", help="base model: alias, local folder, .gguf file or cached hub id")
    parser.add_argument("--method", default="lora", help="full | lora | qlora | dora | spectrum (default lora)")
    parser.add_argument("--rank", type=positive_int, default=16, help="adapter rank r (default 16)")
    parser.add_argument("--seq", type=positive_int, default=2048, help="tokens per sequence (default 2048)")
    parser.add_argument("--batch", type=positive_int, default=1, help="micro-batch size (default 1)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default 1)")
    parser.add_argument("--gpu", metavar="SIZE", help="GPU memory to fit in: 24GB, 80GiB, 16000MB or a name (4090, a100)")
    parser.add_argument("--dtype", default="bf16", help="base weights and activations: bf16 | fp16 | fp32 (default bf16)")
    parser.add_argument("--adapter-dtype", default="fp32", help="adapter weights: fp32 | bf16 (default fp32)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on")
    parser.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or comma-separated names "
                        "(on MoE models resolved as lorakit train resolves them, experts included where PEFT does)")
    parser.add_argument("--target-parameters", default="", metavar="NAMES",
                        help="comma-separated parameters to adapt directly, e.g. mlp.experts.gate_up_proj,mlp.experts.down_proj")
    parser.add_argument("--dropout", type=dropout, default=0.0, help="LoRA dropout (default 0; >0 keeps more activations)")
    parser.add_argument("--engine", default="lorakit", choices=("lorakit", "peft"),
                        help="plan the step as lorakit train runs it (fused adapter layers, chunked loss; default) "
                             "or as PEFT + the model's own loss run it (full logits)")
    parser.add_argument("--top", type=percent, default=25.0, help="Spectrum: percentage selected per module type")
    parser.add_argument("--spectrum-no-embeddings", action="store_true",
                        help="Spectrum: keep embeddings and output head frozen (the reference trains them)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run(args: argparse.Namespace) -> int:
    from lorakit.estimate import Setup, estimate, inventory, parse_size, suggest
    from lorakit.models import load_model_config

    gpu = parse_size(args.gpu) if args.gpu else None
    targets: Any = args.targets if args.targets == "all-linear" else tuple(t.strip() for t in args.targets.split(",") if t.strip())
    setup = Setup(method=args.method, rank=args.rank, batch=args.batch, seq=args.seq, grad_accum=args.grad_accum,
                  dtype=args.dtype, adapter_dtype=args.adapter_dtype, checkpointing=args.checkpointing,
                  targets=targets, dropout=args.dropout, top=args.top, engine=args.engine,
                  target_parameters=tuple(t.strip() for t in args.target_parameters.split(",") if t.strip()),
                  spectrum_embeddings=not args.spectrum_no_embeddings)
    config = load_model_config(args.model)
    inv = inventory(config)
    plan = estimate(config, setup, inv=inv)
    fits = None if gpu is None else plan.total + CUDA_RESERVE <= gpu
    options = suggest(config, setup, gpu - CUDA_RESERVE, inv=inv) if gpu is not None and not fits else []
    if args.json:
        print(json.dumps(_as_json(args.model, inv, plan, gpu, fits, options), indent=2))
    else:
        print(_render(args.model, inv, plan, gpu, fits, options))
    return 0


def _gib(n: int) -> str:
    return f"{n / (1 << 30):8.2f} GiB"


def _m(n: int) -> str:
    return f"{n / 1e6:,.1f} M" if n >= 1e5 else f"{n:,}"


def _describe(inv: Any, plan: Any) -> list[tuple[str, int, str]]:
    from lorakit.estimate import DTYPE_BYTES

    s, d = plan.setup, plan.detail
    base = ("linear layers in NF4 (4.127 bits/param), embeddings and norms " + s.dtype
            if s.method == "qlora" else f"all {_m(plan.params)} params in {s.dtype}")
    trainable = f"{_m(plan.trainable)} trainable"
    opt = "AdamW: 2 fp32 states per trainable param" + (" + fp32 master copy" if d["master_fp32"] else "")
    tokens = s.batch * s.seq
    act = (f"{tokens:,} tokens kept for backward" if plan.peak_at.startswith("start")
           else "the first layer's activations and their gradients")
    if inv.experts and plan.peak_at.startswith("start"):
        act += f", {tokens * inv.dims['top_k']:,} routed (token, expert) pairs per MoE layer"
    if s.checkpointing:
        act += "; checkpointing keeps only layer inputs"
    grads = (f"{DTYPE_BYTES[s.dtype] if s.method in ('full', 'spectrum') else DTYPE_BYTES[s.adapter_dtype]}"
             f" bytes per trainable param" + ("" if plan.gradients else "; produced later, as activations are freed"))
    on = f"{d['adapted_modules']} modules" + (f" + {d['adapted_parameters']} parameters"
                                              f" ({d['adapted_experts']} of them expert weights)"
                                              if d.get("adapted_parameters") else "")
    adapters = f"{_m(d['adapter_params'])} params on {on} in {s.adapter_dtype}" if d["adapter_params"] else "none"
    if s.method == "spectrum":
        adapters = f"none; trains {d['spectrum_matrices']} matrices" + (" + embeddings and head" if s.spectrum_embeddings else "")
    return [("weights", plan.weights, base), ("adapters", plan.adapters, adapters),
            ("gradients", plan.gradients, grads), ("optimizer state", plan.optimizer, f"{opt}; {trainable}"),
            ("activations", plan.activations, act),
            ("logits & loss", plan.logits, _loss_note(inv, plan, tokens))]


def _loss_note(inv: Any, plan: Any, tokens: int) -> str:
    if not plan.logits:
        return "freed by then"
    rows = plan.detail.get("loss_chunk_rows")
    if rows:
        return f"chunked: {rows:,} rows × vocab {inv.dims['vocab']:,} at a time; {tokens:,} tokens' input gradients"
    return f"vocab {inv.dims['vocab']:,} × {tokens:,} tokens, fp32 log-softmax + gradients"


def _render(model: str, inv: Any, plan: Any, gpu: int | None, fits: bool | None, options: list) -> str:
    s, d = plan.setup, inv.dims
    head = "tied" if inv.head == 0 else "untied"
    lines = [f"Memory plan for {model} ({inv.arch}, {_m(inv.params)} params, {d['layers']} layers, "
             f"hidden {d['hidden']}, vocab {d['vocab']:,}, {head} head)",
             f"  params: embeddings {_m(inv.embedding)}, linear {_m(inv.linear_params)}, "
             + (f"experts {_m(inv.expert_params)}, " if inv.experts else "")
             + f"head {_m(inv.head)}, norms/biases{'/routers' if inv.experts else ''} {_m(inv.other)}",
             *([f"  mixture of experts: {d['experts']} experts, top-{d['top_k']}, expert size {d['moe_intermediate']}, "
                f"in {len({e.layer for e in inv.experts})} layers; active per token {_m(inv.active_params)} of "
                f"{_m(inv.params)} ({100 * inv.active_params / inv.params:.1f} %)"] if inv.experts else []),
             f"  {s.method}" + (f" r={s.rank}" if s.method in ("lora", "qlora", "dora") else "")
             + (f" top {s.top:g}%" if s.method == "spectrum" else "")
             + f" · batch {s.batch} × seq {s.seq}" + (f" × accum {s.grad_accum}" if s.grad_accum > 1 else "")
             + f" · {s.dtype} · checkpointing {'on' if s.checkpointing else 'off'}"
             + (f" · dropout {s.dropout:g}" if s.dropout else "") + f" · as {s.engine} runs it", ""]
    for name, value, note in _describe(inv, plan):
        lines.append(f"  {name:<16}{_gib(value)}   {note}")
    lines.append("  " + "─" * 30)
    lines.append(f"  {'peak':<16}{_gib(plan.total)}   at the {plan.peak_at}")
    if gpu is None:
        lines.append("\n  (add --gpu 24GB to check a device; CUDA context ≈0.75 GiB comes on top)")
        return "\n".join(lines)
    need = plan.total + CUDA_RESERVE
    verdict = (f"fits: {need / gpu:.0%} of {gpu / (1 << 30):g} GiB incl. ≈0.75 GiB CUDA context" if fits
               else f"does NOT fit: needs {need / (1 << 30):.2f} GiB incl. ≈0.75 GiB CUDA context, "
                    f"GPU has {gpu / (1 << 30):g} GiB")
    lines.append(f"  {verdict}")
    if not fits:
        lines.append("\n  Changes that would fit:" if options else "\n  No combination of batch, checkpointing, "
                     "QLoRA and sequence length fits this GPU; use a larger GPU or several (FSDP).")
        for label, e in options:
            lines.append(f"    {label:<72}{_gib(e.total)}")
    return "\n".join(lines)


def _as_json(model: str, inv: Any, plan: Any, gpu: int | None, fits: bool | None, options: list) -> dict:
    parts = {name: value for name, value, _ in _describe(inv, plan)}
    return {"model": model, "architecture": inv.arch, "dims": inv.dims,
            "params": {"total": inv.params, "embedding": inv.embedding, "head": inv.head,
                       "linear": inv.linear_params, "experts": inv.expert_params, "active": inv.active_params,
                       "other": inv.other, "trainable": plan.trainable},
            "setup": asdict(plan.setup), "bytes": {**parts, "total": plan.total}, "peak_at": plan.peak_at,
            "detail": plan.detail, "gpu_bytes": gpu, "cuda_reserve_bytes": CUDA_RESERVE, "fits": fits,
            "suggestions": [{"change": label, "total_bytes": e.total, "setup": asdict(e.setup)} for label, e in options]}
