"""The training objective as a module: a batch in, the mean cross-entropy over its answer tokens out.

Training calls the objective rather than the model, so that whatever wraps the step for speed
(a chunked loss) or scale (DDP, FSDP) wraps one module with one ``forward``.

Notable:

- **Chunked loss.** The (tokens × vocab) logits never exist in full. The backbone runs once; then
  only the positions whose (shifted) label is not -100 go through the output head, a chunk of
  rows at a time (:class:`LinearCrossEntropy`). Prompt tokens get no logits at all, which on chat
  data is most of each row. Each chunk's gradient is computed right away in the forward pass
  (the loss is a scalar: its gradient is known up to one factor), so nothing of size vocab is
  kept for backward: only the input gradient of the selected rows, (answers × hidden).
- The result equals ``model(**batch).loss`` (HF: logits in the model's dtype, upcast to fp32,
  mean over targets), padded or packed, tied or untied head. Which path a model takes is decided
  from its structure, with no list of architectures (:func:`head_check`): the chunked path needs a
  causal LM that transformers registers for its ``model_type`` whose ``forward`` computes
  ``logits = self.lm_head(hidden_states)`` from the backbone's last hidden state and never changes
  them (read from its source: soft-capping, logit scaling or a multiplier there take the plain
  path), a config that asks for no logit transform, and a plain ``nn.Linear`` head without hooks
  (an adapted or quantised head takes the plain path). Training says once why a model falls back.
- **Shared prefix.** When every row of a padded micro-batch starts with the same tokens and no
  label scores them (a chat template's default system prompt: 28 of SmolLM2's ~60-token
  quickstart rows), that prefix runs through the model once, as a batch of one; its per-layer
  keys and values are repeated for the rows, which run from there with ``past_key_values``.
  Autograd sums the rows' gradients through the repeat, so loss and gradients are those of the
  whole rows (tested at 1e-5); only the dropout on the prefix's adapter inputs is one draw for
  the micro-batch instead of one per row.
- **No padding mask.** Right-padded rows run without their attention mask (:func:`causal_inputs`):
  under causal attention no real token sees a later position, so the padding is invisible anyway,
  and SDPA's causal kernel skips the upper triangle where a mask would make it compute all T² pairs.
- **Offloading.** With ``offload=True`` the tensors autograd saves for backward (big ones, not
  weights) are copied to pinned CPU memory and brought back when backward needs them. With
  gradient checkpointing, those are only each layer's inputs.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import textwrap
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

IGNORE = -100

# Config fields with which transformers' models transform their logits (soft-capping, scaling); any
# of them set to something other than 1 means the logits are not the head's plain output.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                     "lm_head_multiplier")


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over the tokens whose label is not -100.

    Args:
        model: a transformers causal LM (with adapters).
        chunked: compute head + loss in chunks over the answer tokens only (when the architecture
            allows it; else the model's own loss).
        chunk: rows per chunk (None: about 128 MiB of fp32 logits per chunk).
        offload: keep saved activations in CPU memory between forward and backward (CUDA only).
        share_prefix: run a prefix that all rows share and no label scores once per batch
            (chunked path, padded batches; see the module docstring).
    """

    def __init__(self, model: nn.Module, chunked: bool = True, chunk: int | None = None,
                 offload: bool = False, share_prefix: bool = False) -> None:
        super().__init__()
        self.model = model
        self.chunked, self.chunk, self.offload, self.share_prefix = chunked, chunk, offload, share_prefix

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        context = offloaded(self.model) if self.offload else nullcontext()
        with context:
            parts = split_head(self.model) if self.chunked and "labels" in batch else None
            if parts is None:
                return self.model(**batch, use_cache=False).loss
            backbone, head = parts
            labels = batch.pop("labels")
            aux = router_aux_loss(self.model)
            prefix = shared_prefix(batch, labels) if self.share_prefix and aux is None else 0
            mask = batch.get("attention_mask")  # the router loss counts real tokens only
            batch = causal_inputs(batch)
            extra = 0.0
            if prefix:
                hidden = _after_prefix(backbone, batch, prefix)  # (B, T - prefix, d)
                labels = labels[:, prefix:]
            elif aux is not None:
                out = backbone(**batch, use_cache=False, output_router_logits=True)
                hidden, extra = out[0], aux(out.router_logits, mask)
            else:
                hidden = backbone(**batch, use_cache=False)[0]  # (B, T, d)
            targets = labels[:, 1:]  # the token each position predicts
            keep = targets != IGNORE  # (B, T-1)
            rows = hidden[:, :-1][keep]  # (n, d): only the positions that are scored
            chunk = self.chunk or default_chunk(head.weight.shape[0])
            weight, bias = head.weight, head.bias
            device = rows.device.type
            if torch.is_autocast_enabled(device):  # the head's matmul in the autocast dtype, as autocast does
                dtype = torch.get_autocast_dtype(device)
                rows, weight = rows.to(dtype), weight.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device, enabled=False):
                return LinearCrossEntropy.apply(rows, weight, bias, targets[keep], chunk) + extra


def router_aux_loss(model: nn.Module):
    """``(router_logits, attention_mask) -> coef · load-balancing loss`` when the model's config asks
    for it (``output_router_logits``), with the model's own function and coefficient (those of its
    modeling module, as its forward adds them), else None."""
    if not getattr(getattr(model, "config", None), "output_router_logits", False):
        return None
    balance = getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
    coef = getattr(model, "router_aux_loss_coef", None)
    if balance is None or coef is None:
        return None

    def aux(router_logits, attention_mask):
        loss = balance(router_logits, model.num_experts, model.num_experts_per_tok, attention_mask)
        return coef * loss
    return aux


MIN_PREFIX = 8  # shorter shared prefixes are not worth the second pass through the model
_PREFIX_INPUTS = frozenset({"input_ids", "attention_mask", "position_ids", "labels"})


def shared_prefix(batch: dict[str, torch.Tensor], labels: torch.Tensor) -> int:
    """How many leading tokens every row of a padded batch shares, none of them scored: 0 if fewer
    than :data:`MIN_PREFIX`, for one row, for a packed batch (positions that do not count up) or a
    batch with other inputs than ids, mask and positions.

    The hidden state at position t predicts the label at t + 1, so a prefix of length p needs the
    labels at 1…p to be ignored; at least one position is left to every row.
    """
    ids, mask, positions = batch["input_ids"], batch.get("attention_mask"), batch.get("position_ids")
    if ids.shape[0] < 2 or mask is None or ids.shape[1] <= MIN_PREFIX or set(batch) - _PREFIX_INPUTS:
        return 0  # other inputs (token types, images, …) would have to be split too
    same = (ids == ids[:1]).all(0) & (mask == 1).all(0)  # (T,)
    length = int(same.int().cumprod(0).sum())
    scored = (labels != IGNORE).any(0).nonzero()
    if len(scored):
        length = min(length, int(scored[0]) - 1)
    length = min(length, ids.shape[1] - 1)
    if length < MIN_PREFIX:
        return 0
    if positions is not None and not bool((positions[:, :length] == torch.arange(length, device=ids.device)).all()):
        return 0
    return length


@functools.cache
def _cache_argument(backbone_type: type) -> str:
    # transformers ≥ 5.24 names the argument `cache` (`past_key_values` is deprecated there).
    return "cache" if "cache" in inspect.signature(backbone_type.forward).parameters else "past_key_values"


def _after_prefix(backbone: nn.Module, batch: dict[str, torch.Tensor], prefix: int) -> torch.Tensor:
    """The backbone's last hidden states of the tokens after ``prefix`` (B, T - prefix, d), with the
    shared prefix computed once (batch of one) and its keys/values repeated for every row."""
    from transformers import DynamicCache

    ids = batch["input_ids"]
    cache = DynamicCache(config=getattr(backbone, "config", None))
    name = _cache_argument(type(backbone))
    backbone(input_ids=ids[:1, :prefix], use_cache=True, **{name: cache})
    cache.batch_repeat_interleave(ids.shape[0])  # (1, …) -> (B, …); its backward sums the rows
    rest = {"input_ids": ids[:, prefix:]}
    if "attention_mask" in batch:
        rest["attention_mask"] = batch["attention_mask"]  # the mask spans both parts
    if "position_ids" in batch:
        rest["position_ids"] = batch["position_ids"][:, prefix:]
    return backbone(**rest, use_cache=True, **{name: cache})[0]


def causal_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its padding mask when every row is right-padded (for the causal decoders of
    the chunked path): no real token attends to a later position, so none sees the padding, and
    padding positions are never scored; loss and gradients are the same. Without a mask SDPA runs
    its causal kernel, which skips the pairs above the diagonal; a mask makes it compute all T²."""
    mask = batch.get("attention_mask")
    if mask is None or mask.dim() != 2 or not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        return batch  # no mask, a 4-D mask, or left padding: keep it
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def head_check(model: nn.Module) -> str | None:
    """Why ``model``'s logits are not exactly ``head(backbone(...)[0])`` (so the loss takes the
    model's own path), or None when they are. See the module docstring."""
    reason = _config_check(getattr(model, "config", None), type(model))
    if reason is not None:
        return reason
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(backbone, nn.Module):
        return f"{type(model).__name__} has no backbone at base_model_prefix"
    if type(head) is not nn.Linear:  # an adapted or quantised head
        return f"its output head is a {type(head).__name__}, not a plain nn.Linear"
    if head._forward_hooks or head._forward_pre_hooks:  # someone watches the logits: let the head run
        return "its output head has forward hooks"
    if getattr(model, _forward_head(type(model)) or "", None) is not head:
        return f"{type(model).__name__}.forward's head is not get_output_embeddings()"
    return None


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """``(backbone, head)`` when the model's logits are exactly ``head(backbone(...)[0])``, else None."""
    if head_check(model) is not None:
        return None
    return getattr(model, model.base_model_prefix), model.get_output_embeddings()


def _config_check(config: object, cls: type) -> str | None:
    """Why a model of ``config`` and class ``cls`` is not plain, from the config and the class's
    ``forward``; None when it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    registered = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if registered is None:  # custom code: a forward lorakit cannot vouch for
        return f"model_type {model_type!r} is not a causal LM that transformers registers"
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    transforms = sorted({n for c in (config, text) for n in _LOGIT_TRANSFORMS if getattr(c, n, None) not in (None, 1, 1.0)})
    if transforms:
        return f"its config transforms the logits ({', '.join(transforms)})"
    if _forward_head(cls) is None:
        return f"{cls.__name__}.forward does more than logits = self.lm_head(hidden_states) on the last hidden state"
    return None


@functools.cache
def _forward_head(cls: type) -> str | None:
    """The attribute name of the head when ``cls.forward`` computes ``logits = self.<head>(h)`` once,
    with ``h`` the backbone's last hidden state (``outputs.last_hidden_state`` / ``outputs[0]``,
    possibly sliced), and assigns ``logits`` nowhere else; else None. Read from the source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward))))
    except (OSError, TypeError, SyntaxError):
        return None
    assigned: dict[str, list[ast.expr | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    assigned.setdefault(target.id, []).append(node.value)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name):
            assigned.setdefault(node.target.id, []).append(None)  # an in-place change
    logits = assigned.get("logits", [])
    if len(logits) != 1 or not isinstance(call := logits[0], ast.Call) or len(call.args) != 1 or call.keywords:
        return None
    func, arg = call.func, call.args[0]
    if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"):
        return None
    name = arg.value.id if isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name) else getattr(arg, "id", None)
    if name is None or not all(_is_last_hidden(value, name) for value in assigned.get(name, [None])):
        return None
    return func.attr


def _is_last_hidden(value: ast.expr | None, name: str) -> bool:
    """``outputs.last_hidden_state``, ``outputs[0]``, ``name[...]`` or ``slice_logits_to_keep(name, …)``."""
    if isinstance(value, ast.Attribute):
        return value.attr == "last_hidden_state"
    if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name):
        return value.value.id == name or (isinstance(value.slice, ast.Constant) and value.slice.value == 0)
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.args:
        first = value.args[0]
        return "logits_to_keep" in value.func.id and isinstance(first, ast.Name) and first.id == name
    return False


def default_chunk(vocab: int) -> int:
    """Rows per chunk so one chunk's fp32 logits take about 128 MiB (a multiple of 64, at least 64)."""
    return max(64, (2**25 // vocab) // 64 * 64)


class LinearCrossEntropy(torch.autograd.Function):
    """``mean_i CE(h_i Wᵀ + b, t_i)`` over rows ``h`` (n, d), in chunks of rows.

    Per chunk: ``z = h Wᵀ + b`` in the model's dtype, upcast to fp32; ``loss += Σ (lse(z) − z_t)``;
    ``G = (softmax(z) − onehot(t)) / n``; then ``dh = G W``, ``dW += Gᵀ h``, ``db += Σ G`` (the
    last two only when W, b need gradients). Backward multiplies the kept sums by the incoming
    gradient. Holds between passes: ``dh`` (n, d), never anything of size vocab.
    """

    @staticmethod
    def forward(ctx, h, weight, bias, targets, chunk: int):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for start in range(0, n, chunk):
            hc, tc = h[start:start + chunk], targets[start:start + chunk]
            z = torch.nn.functional.linear(hc, weight, bias).float()  # (c, V)
            lse = torch.logsumexp(z, dim=-1)  # (c,)
            total += (lse - z.gather(1, tc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            z.sub_(lse[:, None]).exp_()  # softmax, in place
            z[torch.arange(len(tc), device=z.device), tc] -= 1.0
            g = z.div_(n).to(h.dtype)  # (c, V): d(mean loss)/dz
            if need_h:
                torch.mm(g, weight.to(g.dtype), out=grad_h[start:start + chunk])
            if need_w:
                grad_w += (g.T @ hc).float()
            if need_b:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        dh = None if grad_h is None else grad_h * grad_out.to(h_dtype)
        dw = None if grad_w is None else (grad_w * grad_out).to(w_dtype)
        db = None if grad_b is None else (grad_b * grad_out).to(b_dtype)
        return dh, dw, db, None, None


@contextmanager
def offloaded(model: nn.Module, min_bytes: int = 1 << 20):
    """Saved-for-backward tensors of at least ``min_bytes`` go to pinned CPU memory until backward.

    Weights (any tensor sharing a parameter's storage) and tensors already on the CPU stay where
    they are.
    """
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor):
        if (t.device.type == "cpu" or t.numel() * t.element_size() < min_bytes
                or t.untyped_storage().data_ptr() in weights):
            return t
        cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=True)
        cpu.copy_(t, non_blocking=True)
        return t.device, cpu

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, cpu = packed
        return cpu.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
