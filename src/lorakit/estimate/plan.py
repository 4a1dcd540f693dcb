"""The plan: what a setup trains, what backward keeps, the peak of one training step by part, and
the changes that bring it under a budget.

The peak of one training step is modelled as

    persistent  = weights + adapters + optimizer state (+ fp32 master copy)
    phase 1     = saved activations + logits/loss backward temporaries (+ grads if accumulating)
    phase 2     = all gradients + one layer's activations           (end of backward)
    peak        = persistent + max(phase 1, phase 2)

Activations follow a pre-norm decoder as transformers implements it (Llama, Mistral, Qwen2,
Gemma …) with SDPA/flash attention (no seq×seq score matrix), fp32 RMSNorm internals and the
plain cross-entropy over the full vocabulary. Each saved tensor is counted only when autograd
really keeps it (a frozen layer does not keep its input). Checked against a measured CPU training
step in tests/test_estimate.py; docs/estimate.md lists what the model leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from lorakit.adapters.config import LoraConfig
from lorakit.adapters.parameter import innermost
from lorakit.adapters.quant import experts_refusal
from lorakit.errors import LorakitError
from lorakit.estimate.model_inventory import Expert, Inventory, Linear, inventory
from lorakit.estimate.setup import DTYPE_BYTES, Setup, nf4_bytes
from lorakit.inject import find_targets, resolve_config
from lorakit.spectrum import module_type
from lorakit.train.loss import default_chunk, head_check

# Adapted layers whose output a later op keeps anyway (the activation or the gate product reads it).
_OUTPUT_KEPT = ("gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "gate_up_proj", "dense_h_to_4h")


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



def _missing_targets(model: Any, targets: list[str]) -> list[str]:
    """The names of ``targets`` that select no module of ``model``, matched as ``add_adapter`` matches them."""
    return [t for t in targets
            if not find_targets(model, LoraConfig(target_modules=[t]), strict=False, allow_empty=True)]


@dataclass(frozen=True)
class ParamTarget:
    """A parameter adapted directly: E experts (1 for a 2-D weight) of fan_in -> fan_out, rank r each."""

    name: str
    experts: int
    fan_in: int
    fan_out: int
    rank: int
    layer: int | None

    @property
    def adapter_params(self) -> int:
        return self.rank * self.experts * (self.fan_in + self.fan_out)


def _adapted(inv: Inventory, s: Setup) -> tuple[list[Linear], list[ParamTarget]]:
    """The linear layers and parameters a LoRA-family setup adapts, resolved on the meta model exactly
    as ``add_adapter`` resolves them (``inject.resolve_config``: name matching, PEFT's MoE rewrite)."""
    if s.method not in ("lora", "qlora", "dora"):
        return [], []
    if s.target_parameters and not inv.experts:
        raise LorakitError("--target-parameters: this model has no mixture-of-experts weights; name linear "
                           "layers with --targets")
    names = "all-linear" if s.targets == "all-linear" else [s.targets] if isinstance(s.targets, str) else list(s.targets)
    missing = _missing_targets(inv.model, names) if names != "all-linear" else []
    if missing:
        known = sorted({lin.name.rsplit(".", 1)[-1] for lin in inv.linears})
        raise LorakitError(f"--targets: {', '.join(missing)} match no linear layer; this model has {', '.join(known)}")
    config = LoraConfig(r=s.rank, lora_alpha=s.rank, target_modules=names,
                        target_parameters=list(s.target_parameters) or None)
    config, modules, params = resolve_config(inv.model, config)
    by_name = {lin.name: lin for lin in inv.linears}
    experts = {e.name: e for e in inv.experts}
    targets = []
    for module, param, key in params:
        kind = module_type(f"{key}")
        e = experts.get(key)
        if e is None:  # a 2-D weight (a router's): (out, in)
            out, fan_in = getattr(innermost(inv.model.get_submodule(module)), param).shape
            e = Expert(key, 1, int(fan_in), int(out), kind[1] if kind else None)
        targets.append(ParamTarget(key, e.experts, e.fan_in, e.fan_out, config.rank_for(key), e.layer))
    if s.method == "dora" and targets:
        raise LorakitError("--method dora: DoRA is not supported on target parameters (the experts), in lorakit or "
                           "PEFT; plan --method lora, or DoRA on --targets without expert weights")
    return [by_name[m] for m in modules if m in by_name], targets


def _spectrum_selection(inv: Inventory, top: float) -> list[Linear]:
    # Which matrices win depends on the scan; how many per group does not (int(len·pct/100)).
    groups: dict[str, list[Linear]] = {}
    for lin in inv.linears:
        kind = module_type(f"{lin.name}.weight")
        if kind is not None:
            groups.setdefault(kind[0], []).append(lin)
    # Worst case for activations: each type's picks start where the previous type's ended, so the
    # selection touches as many distinct layers as it can.
    chosen: list[Linear] = []
    for j, members in enumerate(groups.values()):
        k = int(len(members) * top / 100)
        chosen += [members[(j * k + t) % len(members)] for t in range(k)]
    return chosen


def _layer_activations(inv: Inventory, s: Setup, trained: set[str], adapted: list[Linear],
                       params: list[ParamTarget] = ()) -> tuple[int, int]:
    """(bytes per token kept by all layers, bytes per token of the largest layer)."""
    d, c = inv.dims, DTYPE_BYTES[s.dtype]
    h, L, i = d["hidden"], d["layers"], d["intermediate"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    full = s.method == "full"
    per_layer: dict[int, int] = {n: 0 for n in range(L)}
    by_layer: dict[int, list[Linear]] = {}
    for lin in inv.linears:
        if lin.layer is not None:
            by_layer.setdefault(lin.layer, []).append(lin)
    adapted_names = {lin.name for lin in adapted}
    moe_layers = {e.layer for e in inv.experts}
    for n in range(L):
        lins = by_layer.get(n, [])
        grads = {lin.name.rsplit(".", 1)[-1] for lin in lins if lin.name in trained or lin.name in adapted_names}
        keeps_input = lambda *types: any(t in grads for t in types)  # noqa: E731
        b = 2 * (4 * h + 4)                                  # both norms keep fp32 input + rsqrt
        b += 2 * c * h if full else 0                        # normalised x, for the norm weight's gradient
        b += c * h if keeps_input("q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value") else 0
        b += c * (2 * q + 2 * kv) + 4 * d["heads"]           # SDPA keeps q, k, v, output, logsumexp
        if n in moe_layers:  # the router, the routed experts and any shared expert
            b += _moe_layer_bytes(inv, s, n, lins, grads, [p for p in params if p.layer == n])
        else:
            b += c * h if keeps_input("gate_proj", "up_proj", "c_fc", "fc1", "gate_up_proj", "dense_h_to_4h") else 0
            b += c * i * (3 if d["gated"] else 1)            # gate, act(gate), up  |  fc1 output
            b += c * i if keeps_input("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2") else 0
        for lin in (x for x in lins if x.name in adapted_names):
            a = DTYPE_BYTES[s.adapter_dtype]
            b += lin.fan_in * _dropout_record_bytes(s)       # what dropout removed, per element of x
            b += a * s.rank                                  # A x, kept for B's gradient
            if s.engine == "peft":
                if s.dropout > 0 or a != c:
                    b += a * lin.fan_in                      # its own cast / dropped-out input
                b += 2 * c * lin.fan_out if s.method == "dora" else 0  # W x and s·B A x for the magnitude
            elif s.method == "dora" and lin.name.rsplit(".", 1)[-1] not in _OUTPUT_KEPT:
                b += c * lin.fan_out                         # its output, for the magnitude gradient
        per_layer[n] = b
    if s.method in ("lora", "qlora", "dora") or (s.method == "spectrum" and not s.spectrum_embeddings):
        per_layer[0] -= 4 * h + 4                            # frozen embeddings: layer 0's input needs no grad
    return sum(per_layer.values()), max(per_layer.values())


def _moe_layer_bytes(inv: Inventory, s: Setup, layer: int, lins: list[Linear], grads: set[str],
                     params: list[ParamTarget]) -> int:
    """Bytes per token a mixture-of-experts layer keeps for backward (lorakit's experts implementation
    or, engine peft, transformers' grouped_mm over PEFT's parametrised weights)."""
    d, c, a = inv.dims, DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype]
    h, k, experts = d["hidden"], d["top_k"], d["experts"]
    weights = [e for e in inv.experts if e.layer == layer]
    up = next((e for e in weights if not e.name.endswith("down_proj")), weights[0])
    down = next((e for e in weights if e.name.endswith("down_proj")), weights[-1])
    adapted = {p.name.rsplit(".", 1)[-1]: p for p in params}
    up_name, router = up.name.rsplit(".", 1)[-1], [p for p in params if p.experts == 1]
    # The block's input: kept when the router, a shared expert's first layer or (lorakit: it re-gathers the
    # routed copies from it in backward) the experts' first weight trains.
    lorakit_up = s.engine != "peft" and up_name in adapted
    b = c * h if router or lorakit_up or any(t in grads for t in ("gate_proj", "up_proj", "w1", "w3")) else 0
    b += 4 * experts + 12 * k                               # router: fp32 softmax, top-k values and indices
    shared = next((lin.fan_out for lin in lins if lin.name.rsplit(".", 1)[-1] in ("gate_proj", "up_proj")), 0)
    if shared:                                              # a shared expert (or a dense MLP) beside the routed ones
        b += 3 * c * shared + (c * shared if "down_proj" in grads else 0)
        b += c * h if any(lin.name.endswith("shared_expert_gate") for lin in lins) else 0
    pair = 28 + c * up.fan_out + c * down.fan_in + c * h   # routing indices, gate_up out, act(gate), down out
    if up_name in adapted:  # PEFT: grouped_mm keeps its input for W + ΔW's gradient; lorakit: A x only
        pair += c * h if s.engine == "peft" else a * adapted[up_name].rank
    if "down_proj" in adapted:  # both keep act(gate)·up; lorakit also A x
        pair += c * down.fan_in + (0 if s.engine == "peft" else a * adapted["down_proj"].rank)
    return b + k * pair


def _peft_expert_bytes(s: Setup, params: list[ParamTarget]) -> tuple[int, int]:
    """PEFT's parametrised expert weights: ``W + ΔW`` of every adapted expert weight, kept from forward
    to backward, and the largest one's gradient in backward (bytes)."""
    if s.engine != "peft":
        return 0, 0
    c = DTYPE_BYTES[s.dtype]
    sizes = [c * p.experts * p.fan_in * p.fan_out for p in params if p.experts > 1]
    return sum(sizes), max(sizes, default=0)


def _dropout_record_bytes(s: Setup) -> float:
    """Bytes per element of a layer's input that its dropout keeps for backward: PEFT's bool mask, or
    lorakit's dropped positions (int64, ``p`` per element) up to p = 0.25 and a byte mask above
    (:func:`lorakit.adapters.fused.draw_dropped`)."""
    if s.dropout == 0:
        return 0.0
    return 8 * s.dropout if s.engine == "lorakit" and s.dropout <= 0.25 else 1.0


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
    c, a = DTYPE_BYTES[s.dtype], DTYPE_BYTES[s.adapter_dtype]
    d = inv.dims
    h, V, L, tokens = d["hidden"], d["vocab"], d["layers"], s.batch * s.seq
    if s.method == "qlora" and inv.experts:
        raise LorakitError(experts_refusal(inv.expert_params, inv.params))
    adapted, params = _adapted(inv, s)
    trained = {lin.name for lin in inv.linears} if s.method == "full" else set()
    if s.method == "spectrum":
        trained = {lin.name for lin in _spectrum_selection(inv, s.top)}
    embeddings_train = s.method == "full" or (s.method == "spectrum" and s.spectrum_embeddings)

    # Parameters: base weights, trainable part, adapters.
    linear_params = inv.linear_params
    if s.method == "qlora":
        weights = sum(nf4_bytes(lin.fan_in * lin.fan_out) for lin in inv.linears) + c * (inv.params - linear_params)
    else:
        weights = c * inv.params
    weights += inv.buffer_bytes
    trainable = inv.params if s.method == "full" else 0
    if s.method == "spectrum":
        trainable = sum(lin.fan_in * lin.fan_out for lin in inv.linears if lin.name in trained)
        trainable += (inv.embedding + inv.head) if embeddings_train else 0
    n_tensors = inv.tensors if s.method == "full" else len(trained) + (1 + (inv.head > 0)) * embeddings_train
    adapter_params = sum(s.rank * (lin.fan_in + lin.fan_out) + (lin.fan_out if s.method == "dora" else 0)
                         for lin in adapted) + sum(p.adapter_params for p in params)
    adapters = a * adapter_params
    n_tensors += len(adapted) * (3 if s.method == "dora" else 2) + 2 * len(params)
    master = 4 * trainable if c != 4 else 0                          # fp32 copy of bf16 trainable weights
    master += 4 * adapter_params if a != 4 else 0
    optimizer = 8 * (trainable + adapter_params) + 4 * n_tensors + master  # AdamW m, v (fp32) + step
    grads = c * trainable + a * adapter_params

    # Activations and logits, per token.
    layers_all, layer_max = _layer_activations(inv, s, trained, adapted, params)
    final = 4 * h + 4                                                 # final norm: fp32 input + rsqrt
    final += c * h if s.method == "full" else 0                       # normalised x (norm weight trains)
    final += c * h if embeddings_train else 0                         # its output, for the head's gradient
    rope = 2 * s.seq * d["head_dim"] * 4 // max(tokens, 1)           # cos/sin, shared by the batch
    kept_layers = L * c * h if s.checkpointing else layers_all
    # lorakit's chunked loss (full fine-tuning is planned with the model's own loss, as it is not lorakit's),
    # decided on the meta model as training decides it.
    chunked = s.engine == "lorakit" and s.method != "full" and head_check(inv.model) is None
    rows = min(tokens, default_chunk(V)) if chunked else 0
    if chunked:
        # lorakit's loss: head + cross-entropy per chunk of rows, the input gradient computed in forward.
        # Kept for backward: that gradient (tokens × hidden) and, when the head trains, its fp32 gradient.
        head_grad = 4 * V * h if embeddings_train else 0
        saved = tokens * (kept_layers + final + c * h + rope) + head_grad
        logits_tmp = tokens * c * h + rows * V * (8 + (2 * c if c != 4 else 0))  # the scored rows; one chunk
        kept_logits = tokens * c * h + head_grad
    else:
        saved = tokens * (kept_layers + final + 4 * V + rope)         # log-softmax output is kept (fp32)
        logits_tmp = tokens * V * (8 + (c if c != 4 else 0))          # its gradient and the logits' gradient
        kept_logits = tokens * 4 * V
    dequant = 2 * max((lin.fan_in * lin.fan_out for lin in inv.linears), default=0) * c if s.method == "qlora" else 0
    recompute = tokens * layer_max                                    # the first layer, recomputed or kept
    expert_kept, expert_grad = _peft_expert_bytes(s, params)
    saved += expert_kept
    held_grads = grads if s.grad_accum > 1 else 0
    phase1 = saved + logits_tmp + held_grads
    # Phase 2: backward of the first layer. Its (recomputed) activations and their gradients
    # (≈ two intermediate-sized temporaries) coexist with every gradient except an untied
    # embedding's, which comes last, when the layer's activations are gone.
    late = c * inv.embedding if embeddings_train and inv.head > 0 else 0
    temporaries = tokens * 2 * c * d["intermediate"] + expert_grad
    phase2 = grads - late + recompute + temporaries + (tokens * L * c * h if s.checkpointing else 0)
    if phase1 >= phase2:
        act, logits, g, at = saved - kept_logits + dequant, kept_logits + logits_tmp, held_grads, "start of backward"
    else:
        act, logits, g, at = phase2 - (grads - late) + dequant, 0, grads - late, "end of backward"
    return Estimate(s, inv.params, trainable + adapter_params, weights, adapters, g, optimizer, act, logits, at,
                    detail={"gradients_total": grads, "master_fp32": master, "activations_saved": saved,
                            "adapter_params": adapter_params, "trainable_base_params": trainable,
                            "adapted_modules": len(adapted), "adapted_parameters": len(params),
                            "adapted_experts": sum(p.experts > 1 for p in params),
                            "loss_chunk_rows": rows, "spectrum_matrices": len(trained) if s.method == "spectrum" else 0})


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
