"""What one training step keeps for backward, in bytes per token: the decoder layers and the loss.

Activations follow a pre-norm decoder as transformers implements it (Llama, Mistral, Qwen2,
Gemma …) with SDPA/flash attention (no seq×seq score matrix) and fp32 RMSNorm internals; the
loss is lorakit's chunked one or the plain cross-entropy over the full vocabulary. Each saved
tensor is counted only when autograd really keeps it (a frozen layer does not keep its input).
"""

from __future__ import annotations

from dataclasses import dataclass

from lorakit.estimate.model_inventory import Inventory, Linear
from lorakit.estimate.setup import DTYPE_BYTES, Setup
from lorakit.estimate.targets import ParamTarget, Trained
from lorakit.train.loss import default_chunk, head_check

# Adapted layers whose output a later op keeps anyway (the activation or the gate product reads it).
_OUTPUT_KEPT = ("gate_proj", "up_proj", "c_fc", "fc1", "w1", "w3", "gate_up_proj", "dense_h_to_4h")


def layer_activations(inv: Inventory, s: Setup, trained: Trained) -> tuple[int, int]:
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
    adapted_names = {lin.name for lin in trained.adapted}
    moe_layers = {e.layer for e in inv.experts}
    for n in range(L):
        lins = by_layer.get(n, [])
        grads = {lin.name.rsplit(".", 1)[-1] for lin in lins
                 if lin.name in trained.linears or lin.name in adapted_names}
        keeps_input = lambda *types: any(t in grads for t in types)  # noqa: E731
        b = 2 * (4 * h + 4)                                  # both norms keep fp32 input + rsqrt
        b += 2 * c * h if full else 0                        # normalised x, for the norm weight's gradient
        b += c * h if keeps_input("q_proj", "k_proj", "v_proj", "c_attn", "qkv_proj", "query_key_value") else 0
        b += c * (2 * q + 2 * kv) + 4 * d["heads"]           # SDPA keeps q, k, v, output, logsumexp
        if n in moe_layers:  # the router, the routed experts and any shared expert
            b += _moe_layer_bytes(inv, s, n, lins, grads, [p for p in trained.params if p.layer == n])
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


def peft_expert_bytes(s: Setup, params: list[ParamTarget]) -> tuple[int, int]:
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


@dataclass(frozen=True)
class LossBytes:
    """The output head and the cross-entropy: what they keep for backward, and their temporaries."""

    per_token: int
    """Bytes per token kept for backward: the fp32 log-softmax output (the model's own loss) or the
    input gradient lorakit's chunked loss computes in forward."""
    head_grad: int
    """The head's fp32 gradient, kept from forward when the head trains (chunked loss only)."""
    temporaries: int
    """Logits and their gradients at the start of backward (one chunk of rows when chunked)."""
    kept: int
    """The part of what the step keeps that belongs to the loss (reported with the logits)."""
    rows: int
    """Rows per chunk of the chunked loss; 0 for the full logits at once."""


def loss_bytes(inv: Inventory, s: Setup, trained: Trained, tokens: int) -> LossBytes:
    """What the loss keeps, on the path ``lorakit train`` takes for ``s``, decided on the meta model as
    training decides it (full fine-tuning is planned with the model's own loss, as it is not lorakit's)."""
    c, h, V = DTYPE_BYTES[s.dtype], inv.dims["hidden"], inv.dims["vocab"]
    chunked = s.engine == "lorakit" and s.method != "full" and head_check(inv.model) is None
    if not chunked:  # the log-softmax output is kept (fp32); its gradient and the logits' gradient
        return LossBytes(per_token=4 * V, head_grad=0, temporaries=tokens * V * (8 + (c if c != 4 else 0)),
                         kept=tokens * 4 * V, rows=0)
    # lorakit's loss: head + cross-entropy per chunk of rows, the input gradient computed in forward.
    # Kept for backward: that gradient (tokens × hidden) and, when the head trains, its fp32 gradient.
    rows = min(tokens, default_chunk(V))
    head_grad = 4 * V * h if trained.embeddings else 0
    return LossBytes(per_token=c * h, head_grad=head_grad,
                     temporaries=tokens * c * h + rows * V * (8 + (2 * c if c != 4 else 0)),  # the scored rows; one chunk
                     kept=tokens * c * h + head_grad, rows=rows)
