"""The plan: bytes at the peak of one training step, by part, and the changes that bring it under a budget.

The peak of one training step is modelled as

    persistent  = weights + adapters + optimizer state (+ fp32 master copy)
    phase 1     = saved activations + logits/loss backward temporaries (+ grads if accumulating)
    phase 2     = all gradients + one layer's activations           (end of backward)
    peak        = persistent + max(phase 1, phase 2)

What the activations and the loss keep is :mod:`~lorakit.estimate.activations`; checked against a
measured CPU training step in tests/test_estimate.py; docs/estimate.md lists what the model leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from lorakit.estimate.activations import layer_activations, loss_bytes, peft_expert_bytes
from lorakit.estimate.model_inventory import Inventory, inventory
from lorakit.estimate.setup import DTYPE_BYTES, Setup, nf4_bytes
from lorakit.estimate.targets import Trained, what_trains


@dataclass
class Estimate:
    """Bytes at the peak of one training step, by part; ``total`` is their sum."""

    setup: Setup
    params: int
    trainable: int
    weights: int
    adapters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    peak_at: str
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.activations + self.logits


def estimate(config: Any, setup: Setup | None = None, *, inv: Inventory | None = None) -> Estimate:
    """Plan the memory of one training step.

    Args:
        config: a transformers ``PretrainedConfig`` (``lorakit.models.load_model_config``).
        setup: the training configuration (defaults: LoRA r=16, batch 1, seq 2048, bf16).
        inv: a precomputed :func:`inventory` of ``config`` (saves rebuilding it).

    Returns:
        An :class:`Estimate` whose parts add up to the peak.
    """
    s = setup or Setup()
    inv = inv or inventory(config)
    c = DTYPE_BYTES[s.dtype]
    d = inv.dims
    h, L, tokens = d["hidden"], d["layers"], s.batch * s.seq
    trained = what_trains(inv, s)
    state = _persistent(inv, s, trained)

    # Activations and logits, per token.
    layers_all, layer_max = layer_activations(inv, s, trained)
    final = 4 * h + 4                                                 # final norm: fp32 input + rsqrt
    final += c * h if s.method == "full" else 0                       # normalised x (norm weight trains)
    final += c * h if trained.embeddings else 0                       # its output, for the head's gradient
    rope = 2 * s.seq * d["head_dim"] * 4 // max(tokens, 1)           # cos/sin, shared by the batch
    kept_layers = L * c * h if s.checkpointing else layers_all
    loss = loss_bytes(inv, s, trained, tokens)
    saved = tokens * (kept_layers + final + loss.per_token + rope) + loss.head_grad
    dequant = 2 * max((lin.fan_in * lin.fan_out for lin in inv.linears), default=0) * c if s.method == "qlora" else 0
    recompute = tokens * layer_max                                    # the first layer, recomputed or kept
    expert_kept, expert_grad = peft_expert_bytes(s, trained.params)
    saved += expert_kept
    held_grads = state.grads if s.grad_accum > 1 else 0
    phase1 = saved + loss.temporaries + held_grads
    # Phase 2: backward of the first layer. Its (recomputed) activations and their gradients
    # (≈ two intermediate-sized temporaries) coexist with every gradient except an untied
    # embedding's, which comes last, when the layer's activations are gone.
    late = c * inv.embedding if trained.embeddings and inv.head > 0 else 0
    temporaries = tokens * 2 * c * d["intermediate"] + expert_grad
    phase2 = state.grads - late + recompute + temporaries + (tokens * L * c * h if s.checkpointing else 0)
    if phase1 >= phase2:
        act, logits, g, at = saved - loss.kept + dequant, loss.kept + loss.temporaries, held_grads, "start of backward"
    else:
        act, logits, g, at = phase2 - (state.grads - late) + dequant, 0, state.grads - late, "end of backward"
    return Estimate(s, inv.params, state.trainable + state.adapter_params, state.weights, state.adapters, g,
                    state.optimizer, act, logits, at,
                    detail={"gradients_total": state.grads, "master_fp32": state.master, "activations_saved": saved,
                            "adapter_params": state.adapter_params, "trainable_base_params": state.trainable,
                            "adapted_modules": len(trained.adapted), "adapted_parameters": len(trained.params),
                            "adapted_experts": sum(e.experts > 1 for e in trained.params),
                            "loss_chunk_rows": loss.rows,
                            "spectrum_matrices": len(trained.linears) if s.method == "spectrum" else 0})


@dataclass(frozen=True)
class _Persistent:
    """What lives through the whole step (bytes), and the parameter counts behind it."""

    weights: int         # base weights (QLoRA: linear layers in NF4) and buffers
    trainable: int       # base parameters that train (full, Spectrum)
    adapter_params: int
    adapters: int        # adapter weights
    master: int          # fp32 master copies of 16-bit trainable weights
    optimizer: int       # AdamW's m and v, its step counters and the master copies
    grads: int           # every gradient, all alive at the end of backward


def _persistent(inv: Inventory, s: Setup, trained: Trained) -> _Persistent:
    """Base weights, adapters, AdamW's state and every gradient of ``s`` on the model of ``inv``."""
    c, a = DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype]
    if s.method == "qlora":
        weights = sum(nf4_bytes(lin.fan_in * lin.fan_out) for lin in inv.linears) + c * (inv.params - inv.linear_params)
    else:
        weights = c * inv.params
    weights += inv.buffer_bytes
    trainable = inv.params if s.method == "full" else 0
    if s.method == "spectrum":
        trainable = sum(lin.fan_in * lin.fan_out for lin in inv.linears if lin.name in trained.linears)
        trainable += (inv.embedding + inv.head) if trained.embeddings else 0
    n_tensors = inv.tensors if s.method == "full" else len(trained.linears) + (1 + (inv.head > 0)) * trained.embeddings
    adapter_params = sum(s.rank * (lin.fan_in + lin.fan_out) + (lin.fan_out if s.method == "dora" else 0)
                         for lin in trained.adapted) + sum(p.adapter_params for p in trained.params)
    n_tensors += len(trained.adapted) * (3 if s.method == "dora" else 2) + 2 * len(trained.params)
    master = 4 * trainable if c != 4 else 0                          # fp32 copy of bf16 trainable weights
    master += 4 * adapter_params if a != 4 else 0
    optimizer = 8 * (trainable + adapter_params) + 4 * n_tensors + master  # AdamW m, v (fp32) + step
    return _Persistent(weights, trainable, adapter_params, a * adapter_params, master, optimizer,
                       grads=c * trainable + a * adapter_params)


def suggest(config: Any, setup: Setup, budget: int, *, inv: Inventory | None = None) -> list[tuple[str, Estimate]]:
    """Changes that bring the peak under ``budget`` bytes, each with its new estimate.

    Single changes first (smaller micro-batch with accumulation, checkpointing, QLoRA, shorter
    sequences); when none fits alone, the cumulative combination that does, if any.
    """
    inv = inv or inventory(config)
    found: list[tuple[str, Estimate]] = []

    def attempt(label: str, **changes: Any) -> Estimate:
        e = estimate(config, replace(setup, **changes), inv=inv)
        if e.total <= budget:
            found.append((label, e))
        return e

    b = setup.batch
    while b > 1:
        b = b // 2
        accum = setup.grad_accum * math.ceil(setup.batch / b)
        if attempt(f"--batch {b} with gradient accumulation {accum} (same effective batch)",
                   batch=b, grad_accum=accum).total <= budget:
            break
    if not setup.checkpointing:
        attempt("gradient checkpointing on", checkpointing=True)
    quantizable = not inv.experts  # NF4 covers linear layers only; an MoE model's experts would stay 16-bit
    if setup.method in ("full", "lora", "dora", "spectrum") and quantizable:
        attempt("--method qlora (4-bit NF4 base)", method="qlora")
    if setup.method == "full":
        attempt("--method lora", method="lora")
    seq = setup.seq
    while seq > 128:
        seq //= 2
        if attempt(f"--seq {seq} (shorter sequences)", seq=seq).total <= budget:
            break
    if not found:
        combo = dict(checkpointing=True, method="qlora" if quantizable else setup.method, batch=1,
                     grad_accum=setup.grad_accum * setup.batch)
        label = ("gradient checkpointing + " + ("--method qlora + " if quantizable else "")
                 + "--batch 1 with accumulation")
        seq = setup.seq
        while seq >= 128:
            if attempt(label + (f" + --seq {seq}" if seq != setup.seq else ""), **combo, seq=seq).total <= budget:
                break
            seq //= 2
    return found
