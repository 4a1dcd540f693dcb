"""The adapter registry: PEFT-format adapters, a host copy of each, and N resident slots with an LRU.

Two levels, as in S-LoRA and LoRAX:

- **known** adapters (:meth:`AdapterRegistry.add`): read from a PEFT folder, checked against the
  model (every module, shape and rank), kept in host memory with the scaling folded into B;
  a DoRA adapter also keeps, per module, ``c = m / ‖W + s·B A‖_row`` (out,), computed here once
  from the base weight without an (out × in) temporary (:func:`lorakit.adapters.dora.norm_of`);
- **resident** adapters: at most ``max_resident``, written into preallocated per-layer slots of
  the :class:`~lorakit.serve.layers.BatchedLoraLinear` layers that replace the model's target
  modules (in place, by name). A request pins its adapter's slot while it runs; a new adapter
  takes a free slot or evicts the least recently used unpinned one.

Beyond the target modules, the output head and the input embeddings always get batched layers
(:class:`~lorakit.serve.embedding.BatchedLoraEmbedding`), with tables allocated at the first
adapter that adapts them: an adapter's changes to every layer it trains are served, so its
logprobs are those of its own distribution. Each registered adapter gets a ``version`` (a new one
at every add, also on replace); the version a slot holds keys the engine's prefix cache.

Thread safety: every public method takes one lock. Slots are only written by :meth:`acquire`, which
the engine calls from its own loop between forwards, so a forward never reads a half-written slot.
Removing an adapter that running requests still use takes it off the known list at once (new
requests fail) and frees its slot when the last of them finishes.

Target parameters (MoE expert weights, routers) are served by the layers of
:mod:`lorakit.serve.experts`, installed for every experts module and for the parameters that
``target_modules`` selects under PEFT's MoE rule (or ``target_parameters``).

Refused with a clear message (never served wrongly): ``lora_bias``,
``modules_to_save``, DoRA on an embedding, modules outside the engine's targets, ranks above
``max_rank``, NaN/inf weights.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.adapters import dora
from lorakit.adapters.config import LoraConfig
from lorakit.adapters.layout import features, is_linear, out_in
from lorakit.adapters.peft_format import file_parameters, module_scaling, part_file_key, read_adapter, without_prefix
from lorakit.errors import LorakitError
from lorakit.inject import check_adapter_name, find_targets, set_submodule
from lorakit.serve.embedding import BatchedLoraEmbedding
from lorakit.serve.experts import check_parameter, install_parameters
from lorakit.serve.layers import NO_ADAPTER, BatchedLoraLinear, SlotContext


_MAGNITUDE = "lora_magnitude_vector"  # DoRA's m in PEFT's files: <module>.lora_magnitude_vector
_EMBEDDING_PARTS = {"lora_embedding_A": "lora_A", "lora_embedding_B": "lora_B"}  # same layout as linear (in = vocab)


class AdapterNotFoundError(LorakitError):
    """A request or call named an adapter the registry does not know (HTTP: 404 model_not_found)."""

    code = "model_not_found"


class AdapterSlotsBusyError(LorakitError):
    """Every resident slot is pinned by running requests; retry when one finishes (HTTP: 429)."""

    code = "adapter_slots_busy"


@dataclass(frozen=True)
class AdapterInfo:
    """What the registry knows of one adapter."""

    name: str
    path: str
    rank: int  # the largest rank over its modules
    modules: int  # how many modules it adapts
    resident: bool = False
    dora: bool = False  # a DoRA adapter (``use_dora``): rows scaled per output feature


@dataclass
class _HostAdapter:
    info: AdapterInfo
    # module -> (A, B, scaling, DoRA's c (out,) or None)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]]
    version: int = 0

BASE_VERSION = 0  # the version of "no adapter" (slot NO_ADAPTER)


class AdapterRegistry:
    """Known adapters, resident slots and the LRU, for one base model.

    Args:
        model: the base model; its target modules are replaced in place by batched layers.
        max_resident: slots per layer (adapters resident at once).
        max_rank: the largest rank an adapter may have (vLLM's ``--max-lora-rank``).
        target_modules: which modules can carry adapters (names, regex or ``all-linear``).
        dtype: the slots' dtype (default: the base weights').
    """

    def __init__(self, model: nn.Module, max_resident: int = 8, max_rank: int = 16,
                 target_modules: list[str] | str = "all-linear", dtype: torch.dtype | None = None,
                 target_parameters: list[str] | None = None) -> None:
        if max_resident < 1 or max_rank < 1:
            raise LorakitError(f"max_resident and max_rank must be >= 1, got {max_resident}, {max_rank}")
        self.model = model
        self.max_resident, self.max_rank = max_resident, max_rank
        self.context = SlotContext()
        # Parameters first: resolving them looks at the model before its linear layers are replaced.
        self.parameter_layers = install_parameters(model, target_modules, target_parameters, max_resident, max_rank,
                                                   self.context, dtype)
        self.layers = self._install(model, target_modules, dtype)
        self._known: dict[str, _HostAdapter] = {}
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # resident, least recently used first
        self._slot_name: list[str | None] = [None] * max_resident
        self._slot_rank: list[int] = [0] * max_resident
        self._slot_version: list[int] = [BASE_VERSION] * max_resident
        self._pins: list[int] = [0] * max_resident
        self._versions = itertools.count(BASE_VERSION + 1)
        self._lock = threading.RLock()

    def _install(self, model: nn.Module, targets: list[str] | str,
                 dtype: torch.dtype | None) -> dict[str, BatchedLoraLinear | BatchedLoraEmbedding]:
        names = find_targets(model, LoraConfig(target_modules=targets), strict=True)
        owner = {id(m): n for n, m in model.named_modules()}
        extras = [owner.get(id(m)) for m in (_get_embeddings(model, "output"), _get_embeddings(model, "input"))]
        layers = {}
        for name in names + [n for n in extras if n is not None and n not in names]:
            base = model.get_submodule(name)
            if isinstance(base, (BatchedLoraLinear, BatchedLoraEmbedding)):
                raise LorakitError(f"module {name} already serves adapters; build one registry per model")
            lazy = name not in names  # the head and embeddings: tables only once an adapter needs them
            if isinstance(base, nn.Embedding):
                layer = BatchedLoraEmbedding(base, self.max_resident, self.max_rank, self.context,
                                             dtype or base.weight.dtype)
            elif is_linear(base):
                in_f, out_f, _ = features(base)
                layer = BatchedLoraLinear(base, self.max_resident, self.max_rank, self.context, in_f, out_f,
                                          dtype or base.weight.dtype, lazy=lazy)
            elif lazy:
                continue  # an unusual head or embedding module: adapters on it are refused by name
            else:
                raise LorakitError(f"module {name} is a {type(base).__name__}; the engine serves LoRA on "
                                   "linear layers and embeddings only")
            set_submodule(model, name, layer)
            layers[name] = layer
        return layers

    # -- known adapters ----------------------------------------------------------------------

    def add(self, name: str, folder: str | Path, replace: bool = False) -> AdapterInfo:
        """Read the PEFT adapter in ``folder`` and register it as ``name`` (not yet resident).

        Args:
            name: the name requests use.
            folder: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
            replace: allow replacing a known adapter of the same name (its slot is refreshed
                once no running request uses it).

        Raises:
            LorakitError: the folder is not a servable adapter for this model; the message says why.
        """
        check_adapter_name(name)
        adapter = self._read(name, Path(folder))  # slow part outside the lock
        with self._lock:
            if name in self._known and not replace:
                raise LorakitError(f"adapter {name!r} is already loaded; unload it first or pass replace=True")
            if name in self._known:
                self._forget(name)
            adapter.version = next(self._versions)
            self._known[name] = adapter
        return adapter.info

    def remove(self, name: str) -> None:
        """Forget adapter ``name``: new requests for it fail; its slot frees when unused.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        with self._lock:
            if name not in self._known:
                raise AdapterNotFoundError(f"no adapter named {name!r} (loaded: {', '.join(self._known) or 'none'})")
            self._forget(name)

    def _forget(self, name: str) -> None:
        del self._known[name]
        slot = self._slot_of.get(name)
        if slot is not None and self._pins[slot] == 0:
            self._free(slot)
        elif slot is not None:
            self._slot_of.pop(name)  # pinned: _release frees it (its name is no longer known)

    def _free(self, slot: int) -> None:
        name = self._slot_name[slot]
        if name is not None and self._slot_of.get(name) == slot:
            del self._slot_of[name]
        self._slot_name[slot] = None
        self._slot_rank[slot] = 0

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._known

    def names(self) -> list[str]:
        """Known adapters, in the order they were added."""
        with self._lock:
            return list(self._known)

    def resident(self) -> list[str]:
        """Resident adapters, least recently used first."""
        with self._lock:
            return list(self._slot_of)

    def version(self, name: str | None) -> int:
        """The version of adapter ``name`` as registered now (``BASE_VERSION`` for None)."""
        if name is None:
            return BASE_VERSION
        with self._lock:
            if name not in self._known:
                raise AdapterNotFoundError(f"no adapter named {name!r} (loaded: {', '.join(self._known) or 'none'})")
            return self._known[name].version

    def slot_version(self, slot: int) -> int:
        """The version of the adapter written in ``slot`` (stable while the slot is pinned)."""
        if slot == NO_ADAPTER:
            return BASE_VERSION
        with self._lock:
            return self._slot_version[slot]

    def info(self, name: str) -> AdapterInfo:
        """What the registry knows of ``name``."""
        with self._lock:
            if name not in self._known:
                raise AdapterNotFoundError(f"no adapter named {name!r} (loaded: {', '.join(self._known) or 'none'})")
            info = self._known[name].info
            return AdapterInfo(**{**info.__dict__, "resident": name in self._slot_of})

    # -- resident slots ----------------------------------------------------------------------

    def acquire(self, name: str | None) -> int:
        """Pin ``name``'s slot for a request, loading it (and evicting the LRU) if needed.

        Returns:
            The slot, or ``NO_ADAPTER`` for ``name=None`` (the base model).

        Raises:
            AdapterNotFoundError: ``name`` is unknown.
            AdapterSlotsBusyError: it is not resident and every slot is pinned.
        """
        if name is None:
            return NO_ADAPTER
        with self._lock:
            if name not in self._known:
                raise AdapterNotFoundError(f"no adapter named {name!r} (loaded: {', '.join(self._known) or 'none'})")
            slot = self._slot_of.get(name)
            if slot is None:
                slot = self._take_slot(name)
                self._write(slot, self._known[name])
                self._slot_of[name] = slot
                self._slot_name[slot] = name
                self._slot_rank[slot] = self._known[name].info.rank
                self._slot_version[slot] = self._known[name].version
            self._slot_of.move_to_end(name)
            self._pins[slot] += 1
            return slot

    def release(self, slot: int) -> None:
        """Unpin a slot taken by :meth:`acquire` (``NO_ADAPTER`` is ignored)."""
        if slot == NO_ADAPTER:
            return
        with self._lock:
            self._pins[slot] -= 1
            name = self._slot_name[slot]
            if self._pins[slot] == 0 and name is not None and self._slot_of.get(name) != slot:
                self._free(slot)  # removed (or replaced) while it ran

    def _take_slot(self, name: str) -> int:
        for slot, owner in enumerate(self._slot_name):
            if owner is None and self._pins[slot] == 0:
                return slot
        for victim, slot in self._slot_of.items():  # least recently used first
            if self._pins[slot] == 0:
                self._free(slot)
                return slot
        raise AdapterSlotsBusyError(
            f"cannot make adapter {name!r} resident: all {self.max_resident} slots are used by running "
            "requests; it will be loaded when one finishes (raise max_resident to serve more at once)")

    def _write(self, slot: int, adapter: _HostAdapter) -> None:
        for module, layer in self.layers.items():
            A, B, scaling, scale = adapter.weights.get(module, (None, None, 0.0, None))
            layer.write_slot(slot, A, B, scaling, scale)
        for key, (layer, weight) in self.parameter_layers.items():
            A, B, scaling, _ = adapter.weights.get(key, (None, None, 0.0, None))
            if weight is None:
                layer.write_slot(slot, A, B, scaling)
            else:
                layer.write_slot(slot, weight, A, B, scaling)

    def slot_ranks(self) -> list[int]:
        """The rank resident in each slot (0 for a free slot)."""
        return list(self._slot_rank)

    # -- reading a folder --------------------------------------------------------------------

    def _read(self, name: str, folder: Path) -> _HostAdapter:
        if not folder.is_dir():
            raise LorakitError(f"adapter folder {folder} does not exist")
        config = LoraConfig.load(folder)
        _refuse_unservable(config, folder)
        file = read_adapter(folder, config=config)
        source = file.source
        for key, tensor in file.other.items():
            if not self._is_base_copy(key, tensor, source):
                raise LorakitError(f"{source}: tensor {key} is not a LoRA weight (expected <module>.lora_A.weight / "
                                   "lora_B.weight); the engine serves plain LoRA adapters only")
        weights, ranks = {}, []
        parameters = file_parameters(list(file.modules), config.target_parameters)  # file module -> parameter
        for module, parts in file.modules.items():
            if module in parameters:
                key = parameters[module]
                weights[key], rank = check_parameter(self.parameter_layers, key, module, parts, config, self.max_rank,
                                                     source)
            else:
                weights[module] = self._check_module(module, parts, config, source)
                rank = weights[module][0].shape[0]
            ranks.append(rank)
        if not weights:
            raise LorakitError(f"{source}: holds no LoRA weights")
        rank = max(ranks)
        info = AdapterInfo(name=name, path=str(folder), rank=rank, modules=len(weights), dora=config.use_dora)
        return _HostAdapter(info, weights)

    def _is_base_copy(self, key: str, tensor: torch.Tensor, source: Path) -> bool:
        """Whether ``key`` is a copy of a base weight (PEFT saves the embeddings' when it adapts them):
        skipped when equal to the base's; a different one (a resized or retrained vocabulary) cannot
        vary per request and is refused."""
        module, _, rest = without_prefix(key).rpartition(".base_layer.")
        layer = self.layers.get(module)
        if layer is None or rest != "weight":
            return False
        base = layer.base_layer.weight
        if tuple(tensor.shape) == tuple(base.shape) and torch.equal(tensor.to(base.device, base.dtype), base):
            return True
        raise LorakitError(f"{source}: {key} replaces the base model's {module} weight (a resized or retrained "
                           "vocabulary), which the multi-adapter engine cannot vary per request; merge the adapter "
                           "with `lorakit merge` and serve the merged model")

    def _check_module(self, module: str, parts: dict[str, torch.Tensor], config: LoraConfig,
                      source: Path) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]:
        embedding_parts = any(part in _EMBEDDING_PARTS for part in parts)
        parts = {_EMBEDDING_PARTS.get(part, part): tensor for part, tensor in parts.items()}  # checked as linear
        for part in parts:
            if part not in ("lora_A", "lora_B", _MAGNITUDE):
                raise LorakitError(f"{source}: tensor {part_file_key(module, part)} is not a LoRA weight (expected "
                                   "<module>.lora_A.weight / lora_B.weight); the engine serves plain LoRA adapters only")
        wanted = {"lora_A", "lora_B"} | ({_MAGNITUDE} if config.use_dora else set())
        if set(parts) != wanted:
            if _MAGNITUDE in parts:
                raise LorakitError(f"{source}: module {module} has a DoRA magnitude ({_MAGNITUDE}) but the "
                                   "config says use_dora: false; the files do not belong together")
            missing = ", ".join(p if p == _MAGNITUDE else f"{p}.weight" for p in sorted(wanted - set(parts)))
            raise LorakitError(f"{source}: module {module} lacks {missing}")
        layer = self.layers.get(module)
        if isinstance(layer, BatchedLoraEmbedding) and config.use_dora:
            raise LorakitError(f"{source}: DoRA on the embedding {module} is not served (nor trained by lorakit); "
                               "merge the adapter with `lorakit merge` and serve the merged model")
        if layer is None and config.target_parameters:
            raise LorakitError(
                f"{source}: module {module!r} holds LoRA that is neither on a linear layer this engine serves nor on "
                f"one of its target_parameters ({', '.join(config.target_parameters)}) that it can read back; check "
                "that the adapter belongs to this base model")
        if layer is None:
            raise LorakitError(
                f"{source}: adapts module {module!r}, which this engine does not serve "
                f"(it serves {len(self.layers)} modules chosen by target_modules); start the engine with "
                "target_modules covering it, or check that the adapter belongs to this base model")
        if embedding_parts != isinstance(layer, BatchedLoraEmbedding):
            kind, other = ("an embedding", "a linear layer") if embedding_parts else ("a linear", "an embedding")
            raise LorakitError(f"{source}: module {module} holds {kind} LoRA (PEFT's lora_embedding_A/B or "
                               f"lora_A/B) but is {other} in this base model; the adapter was trained on a "
                               "different base model")
        A, B = parts["lora_A"], parts["lora_B"]
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or tuple(B.shape) != (layer.out_features, r):
            raise LorakitError(
                f"{source}: module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} do not fit "
                f"a layer of {layer.in_features} inputs and {layer.out_features} outputs; the adapter was "
                "trained on a different base model")
        if r > self.max_rank:
            raise LorakitError(f"{source}: module {module} has rank {r}, above this engine's max_rank "
                               f"{self.max_rank}; start the engine with max_rank >= {r}")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise LorakitError(f"{source}: module {module} holds NaN or inf values")
        if config.rank_for(module) != r:
            raise LorakitError(f"{source}: module {module} has rank {r} but the config says "
                               f"{config.rank_for(module)} (r / rank_pattern); the files do not belong together")
        scaling = module_scaling(config, module)
        scale = _dora_scale(layer, module, parts[_MAGNITUDE], A, B, scaling, source) if config.use_dora else None
        return A.float(), B.float(), scaling, scale


def _dora_scale(layer: BatchedLoraLinear, module: str, magnitude: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                scaling: float, source: Path) -> torch.Tensor:
    """DoRA's ``c = m / ‖W + s·B A‖_row`` (out,) for one module, fp32 on the host."""
    if tuple(magnitude.shape) != (layer.out_features,):
        raise LorakitError(f"{source}: module {module}: {_MAGNITUDE} {tuple(magnitude.shape)} does not fit a layer "
                           f"of {layer.out_features} outputs; the adapter was trained on a different base model")
    weight = out_in(layer.base_layer.weight, layer.fan_in_fan_out)  # (out, in)
    scale = magnitude.float().to(weight.device) / dora.norm_of(weight, A, B, scaling)
    if not torch.isfinite(scale).all():
        raise LorakitError(f"{source}: module {module}: the DoRA magnitude holds NaN/inf values, or a row of "
                           "W + s·B A has norm zero")
    return scale.cpu()


def _refuse_unservable(config: LoraConfig, folder: Path) -> None:
    if config.lora_bias:
        raise LorakitError(f"{folder}: lora_bias adapters are not served by the multi-adapter engine; "
                           "merge it with `lorakit merge` instead")
    if config.modules_to_save:
        raise LorakitError(
            f"{folder}: modules_to_save {config.modules_to_save} (fully trained copies of modules) cannot "
            "be batched across adapters; merge it with `lorakit merge` and serve the merged model")
    if config.bias != "none":
        raise LorakitError(f"{folder}: bias={config.bias!r} trains base biases, which the multi-adapter "
                           "engine cannot vary per request; merge it with `lorakit merge` instead")


def _get_embeddings(model: nn.Module, which: str) -> nn.Module | None:
    getter = getattr(model, f"get_{which}_embeddings", None)
    try:
        return getter() if getter is not None else None
    except NotImplementedError:  # transformers raises it for models without one
        return None
