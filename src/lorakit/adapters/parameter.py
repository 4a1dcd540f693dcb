"""LoRA on one ``nn.Parameter`` of a module: PEFT's ``target_parameters`` (its ``ParamWrapper``).

::

    mlp.experts                       LoraParameter(down_proj)           keys: mlp.experts.lora_A …
      └─ base_layer                     LoraParameter(gate_up_proj)            mlp.experts.base_layer.lora_A …
           └─ base_layer                  Qwen3MoeExperts (gate_up_proj, down_proj)

One wrapper per targeted parameter; several parameters of one module nest, the first in the
module's own parameter order innermost, so that state-dict keys are PEFT's key for key. For a
parameter of shape (E, out, in) (or (E, in, out) where the module says ``is_transposed``):
``lora_A`` is an ``nn.Linear`` (in → r·E), ``lora_B`` one (r·E → out), expert e's update is
``ΔW_e = s · B_e A_e`` with ``A_e = A[e·r:(e+1)·r]`` and ``B_e = B[:, e::E]``
(:func:`lorakit.adapters.experts.expert_factors`). A 2-D parameter (a router's (E, H) weight)
is the E = 1 case: ``ΔW = s · B A`` in the parameter's (out, in) layout.

How the forward runs: the outermost wrapper collects the active updates of the whole nest, then

- over an experts module served by transformers' experts interface, calls that module with the
  updates; its config is routed to lorakit's implementation
  (:func:`lorakit.adapters.experts.experts_forward`), which applies them to the routed tokens
  only — ΔW is never formed;
- over any other module (2-D parameters only), runs it once with ``W + ΔW`` in place of the
  parameter (``torch.func.functional_call``: the module and its class stay untouched). ΔW is
  the size of that one matrix, as in PEFT.

Merging writes ``W + ΔW`` into the parameter itself (one expert at a time for 3-D weights).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.adapters import experts
from lorakit.adapters.lora import AdapterOptions, LoraLayer
from lorakit.errors import LorakitError


class LoraParameter(LoraLayer):
    """LoRA adapters on ``base_layer``'s parameter ``parameter_name`` (2-D, or 3-D experts)."""

    adapter_attrs = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        super().__init__(base_layer)
        self.parameter_name = parameter_name
        module = innermost(base_layer)
        check_target(module, parameter_name)
        param = getattr(module, parameter_name)
        if param.dim() == 3:
            self.num_experts, a, b = param.shape
            self.in_features, self.out_features = (a, b) if module.is_transposed else (b, a)
        else:
            self.num_experts = 1
            self.out_features, self.in_features = param.shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.replaced_implementation: str | None = None  # the experts implementation before lorakit's

    # -- the wrapped parameter -----------------------------------------------------------------

    @property
    def target_module(self) -> nn.Module:
        """The module that owns the parameter (below every nested wrapper)."""
        return innermost(self.base_layer)

    @property
    def base_weight(self) -> nn.Parameter:
        return getattr(self.target_module, self.parameter_name)

    @property
    def is_experts(self) -> bool:
        return self.num_experts > 1 or self.base_weight.dim() == 3

    def dense_weight(self) -> torch.Tensor:
        return self.base_weight.float()

    # -- adapters ------------------------------------------------------------------------------

    def _create(self, name: str, options: AdapterOptions) -> None:
        check_options(options, self.parameter_name)
        rank = options.r * self.num_experts
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False)
        if self.is_experts:
            self.replaced_implementation = self.replaced_implementation or experts.use_lorakit_experts(
                self.target_module)

    def _init(self, name: str, init: bool | str) -> None:
        if init is False:
            return  # nn.Linear's own init: a non-zero update (tests)
        A, B = self.lora_A[name], self.lora_B[name]
        if init in (True, "kaiming"):
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(A.weight, std=1 / self.options[name].r)
        nn.init.zeros_(B.weight)

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapter ``name``'s per-expert A (E, r, in) and B (E, out, r) (differentiable views)."""
        return experts.expert_factors(self.lora_A[name].weight, self.lora_B[name].weight, self.num_experts)

    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` in the parameter's own layout, fp32: (E, out, in) / (E, in, out), or (out, in).

        Forms the full tensor: for tests and reports only — merging goes expert by expert, and
        forward and backward never form it.
        """
        return torch.stack(list(self._deltas(name))) if self.is_experts else next(self._deltas(name))

    def _deltas(self, name: str):
        """Each expert's ``ΔW_e`` in the parameter's layout, fp32, one at a time (the factors laid
        out once); a 2-D parameter's one ΔW."""
        with torch.no_grad():
            A, B = (t.detach().float() for t in self.factors(name))  # (E, r, in), (E, out, r)
        s = self.scaling[name]
        transposed = self.is_experts and self.target_module.is_transposed
        for e in range(self.num_experts):
            delta = (B[e] @ A[e]) * s  # (out, in)
            yield delta.T if transposed else delta

    # -- merging -------------------------------------------------------------------------------

    def merged_weights(self, names: list[str]) -> tuple[torch.Tensor, None]:
        """The parameter with ``names`` folded in, fp32 (a full copy: for tests; merging checks
        expert by expert, :meth:`check_merge`)."""
        weight = self.dense_weight()
        for name in names:
            weight = weight + self.delta_weight(name)
        if not torch.isfinite(weight).all():
            raise LorakitError(f"adapter(s) {', '.join(names)} hold NaN or inf values; refusing to merge")
        return weight, None

    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters (default: the active ones) into the parameter, in place. Idempotent.

        Expert weights change one expert at a time (no second copy of the whole stack); every
        expert's result is checked for NaN/inf before the first one is written.
        """
        names = self.active if names is None else [n for n in names if n in self.options]
        todo = [n for n in names if n not in self.merged]
        if not todo:
            return
        self.check_merge(todo)
        self._apply(todo, sign=1.0)
        self.merged.extend(todo)

    def _unmerge_one(self, name: str) -> None:
        self._apply([name], sign=-1.0)
        self.merged.remove(name)

    def _merged_slices(self, names: list[str], sign: float):
        """``(target slice, its fp32 value with the updates of names)`` per expert (or the whole 2-D weight)."""
        weight = self.base_weight
        targets = list(weight) if self.is_experts else [weight]
        for target, *deltas in zip(targets, *(self._deltas(n) for n in names)):
            yield target, target.float() + sign * sum(deltas)

    @torch.no_grad()
    def check_merge(self, names: list[str]) -> None:
        """Raise if merging ``names`` would put NaN/inf into the weight (checked expert by expert)."""
        for _, merged in self._merged_slices(names, 1.0):
            if not torch.isfinite(merged).all():
                raise LorakitError(f"adapter(s) {', '.join(names)} hold NaN or inf values; refusing to merge")

    @torch.no_grad()
    def _apply(self, names: list[str], sign: float) -> None:
        for target, merged in self._merged_slices(names, sign):
            target.copy_(merged.to(target.dtype))

    # -- forward -------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        """The wrapped module's forward with the active updates of this wrapper and those below it."""
        module = self.target_module
        updates = _active_updates(self)
        if not updates:
            return module(*args, **kwargs)
        if experts.is_interface_experts(module) and all(n in experts.weight_names(module) for n in updates):
            implementation = module.config._experts_implementation
            if implementation != experts.IMPLEMENTATION:
                raise LorakitError(
                    f"{type(module).__name__}: the model's experts implementation was changed to {implementation!r} "
                    f"after expert adapters were added; lorakit's expert LoRA runs as {experts.IMPLEMENTATION!r} "
                    f"(set it back with model.set_experts_implementation({experts.IMPLEMENTATION!r}))")
            return module(*args, **kwargs, **{experts.UPDATES_KWARG: updates})
        replaced = {}
        for name, items in updates.items():
            weight = getattr(module, name)
            delta = sum(item.scaling * (item.B @ item.A) for item in items)  # (out, in): one small matrix (E = 1)
            replaced[name] = weight + delta.to(weight.dtype)
        return torch.func.functional_call(module, replaced, args, kwargs, strict=False)

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, experts={self.num_experts}; " + super().extra_repr()


def check_target(module: nn.Module, parameter_name: str) -> None:
    """Raise unless ``module.parameter_name`` can carry LoRA: a 2-D weight of any module, or an expert
    weight of an experts module that transformers' experts interface serves."""
    param = getattr(module, parameter_name, None)
    kind = type(module).__name__
    if not isinstance(param, nn.Parameter):
        raise LorakitError(f"{kind} has no parameter {parameter_name!r}")
    if param.dim() == 3:
        if not experts.is_interface_experts(module) or parameter_name not in experts.weight_names(module):
            raise LorakitError(
                f"target parameter {parameter_name!r} of {kind} is 3-D but that module does not run through "
                "transformers' experts interface (@use_experts_implementation), so lorakit cannot apply LoRA to "
                "the tokens routed to each expert (and does not materialise ΔW for all experts); target its 2-D "
                "parameters or linear layers instead")
    elif param.dim() == 2:
        if experts.is_interface_experts(module):
            raise LorakitError(f"target parameter {parameter_name!r} of {kind}: on an experts module only the "
                               f"weights {', '.join(experts.weight_names(module))} can be targeted")
    else:
        raise LorakitError(f"target parameter {parameter_name!r} of {kind} has {param.dim()} dimensions; LoRA on "
                           "a parameter needs a 2-D weight or 3-D expert weights")


def check_options(options: AdapterOptions, parameter_name: str) -> None:
    """Raise for what LoRA on a parameter does not support (as in PEFT, whose file it must stay)."""
    where = f"target parameter {parameter_name!r}"
    if options.dropout > 0:
        raise LorakitError(f"{where}: lora_dropout must be 0 on target parameters (PEFT refuses it there and "
                           f"could not load the adapter); got {options.dropout}")
    if options.lora_bias:
        raise LorakitError(f"{where}: lora_bias is not supported on target parameters (nor by PEFT)")
    if options.use_dora:
        raise LorakitError(f"{where}: DoRA is not supported on target parameters (PEFT does not implement it "
                           "for target_parameters either, so no tool could load the adapter); use plain LoRA "
                           "on the experts, or DoRA on target_modules only")
    if isinstance(options.init, str) and options.init not in ("kaiming", "gaussian"):
        raise LorakitError(f"{where}: init {options.init!r} is not supported on target parameters "
                           "(use kaiming or gaussian)")


def innermost(module: nn.Module) -> nn.Module:
    """The module below every :class:`LoraParameter` wrapper."""
    while isinstance(module, LoraParameter):
        module = module.base_layer
    return module


def wrappers(module: nn.Module) -> list[LoraParameter]:
    """The nest of :class:`LoraParameter` wrappers from ``module`` down (outermost first)."""
    found = []
    while isinstance(module, LoraParameter):
        found.append(module)
        module = module.base_layer
    return found


def _active_updates(outer: LoraParameter) -> dict[str, list[experts.ExpertUpdate]]:
    updates: dict[str, list[experts.ExpertUpdate]] = {}
    for layer in wrappers(outer):
        items = []
        for name in layer._branch_names():
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight  # PEFT's stacked layout
            items.append(experts.ExpertUpdate(A, B, layer.scaling[name], experts=layer.num_experts))
        if items:
            updates[layer.parameter_name] = items
    return updates
