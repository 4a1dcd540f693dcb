"""The PEFT adapter format, defined once (REFERENCE.md "PEFT adapter format").

An adapter folder holds ``adapter_config.json`` (:class:`~lorakit.adapters.config.LoraConfig`)
and ``adapter_model.safetensors``. A file key is the model's state-dict key with the adapter name
dropped and ``base_model.model.`` in front::

    model key:  model.layers.0.self_attn.q_proj.lora_A.default.weight
    file key:   base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    model key:  model.layers.0.self_attn.q_proj.lora_magnitude_vector.default.weight   (DoRA's m)
    file key:   base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector
    model key:  lm_head.modules_to_save.default.weight
    file key:   base_model.model.lm_head.weight
    model key:  model.layers.0.self_attn.q_proj.base_layer.bias   (a trained base bias: as is)
    file key:   base_model.model.model.layers.0.self_attn.q_proj.base_layer.bias

Several adapters in one folder: ``default`` at the top, every other one in a sub-folder named
after it (:func:`adapter_folder`, :func:`adapter_folders`).

What this module owns, so that nothing else parses keys or recomputes scales:

- which tensors are an adapter's: every per-adapter container on a LoRA layer is named
  ``lora_*`` (PEFT's convention), copies of ``modules_to_save`` sit under ``modules_to_save``
  (:data:`ADAPTER_PARTS`, :func:`is_adapter_tensor`, :func:`is_wrapper_module`);
- model key ↔ file key (:func:`file_key`, :func:`split_file_key`, :func:`module_of`);
- the scale ``alpha/r`` or ``alpha/√r`` (:func:`scaling`, :func:`module_scaling`);
- reading a folder: tensors (:func:`read_tensors`), shapes from the header only
  (:func:`read_shapes`), tensors grouped by module (:func:`read_adapter`), the low-rank factors
  with their scales (:func:`read_factors`).

Tensors load from safetensors only; a pickle ``adapter_model.bin`` is refused unless the caller
opts in, and is then read with ``torch.load(weights_only=True)``.

LoRA on parameters (PEFT 0.21.2's ``target_parameters``, REFERENCE.md "Mixture-of-experts") is
saved under the module's name, one ``base_layer.`` deeper for each further parameter of the same
module, the module's first parameter innermost::

    model key:  model.layers.0.mlp.experts.base_layer.lora_A.default.weight   (gate_up_proj)
    file key:   base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight   (r·E, H)
    model key:  model.layers.0.mlp.experts.lora_B.default.weight   (down_proj)
    file key:   base_model.model.model.layers.0.mlp.experts.lora_B.weight   (H, r·E)

A 3-D expert weight (E, out, in) holds all E experts' factors stacked: A (r·E, in) expert-major,
B (out, r·E) rank-major, so expert e's update is ``s · B[:, e::E] @ A[e·r:(e+1)·r]``
(:meth:`Factors.expert`). Readers get the parameter behind each file module from
:func:`file_parameters` and the rank per expert from :func:`parameter_rank`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.adapters.config import CONFIG_NAME, LoraConfig
from lorakit.errors import LorakitError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
"""The per-adapter containers of a LoRA layer whose tensors are saved."""
MODULES_TO_SAVE = "modules_to_save"
"""Where a ``modules_to_save`` wrapper keeps each adapter's trained copy (the original: ``original_module``)."""

# A file key's ending -> the part it holds. PEFT writes DoRA's m without ``.weight``; files that have
# it are read too (the first ending of a part is the one written).
_FILE_PARTS = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_B.bias": "lora_B.bias",
    ".lora_embedding_A": "lora_embedding_A",
    ".lora_embedding_B": "lora_embedding_B",
    ".lora_magnitude_vector": "lora_magnitude_vector",
    ".lora_magnitude_vector.weight": "lora_magnitude_vector",
}
_PARTS_RE = "|".join(ADAPTER_PARTS)
_CONTAINER = re.compile(r"^lora_[A-Za-z_]+$")
_ADAPTER_TENSOR = re.compile(rf"(^|\.)(lora_[A-Za-z_]+|{MODULES_TO_SAVE}|original_module)\.")
_WRAPPER_MODULE = re.compile(rf"(^|\.)(base_layer|lora_[A-Za-z_]+|{MODULES_TO_SAVE}|original_module)(\.|$)")


# -- which tensors belong to an adapter ----------------------------------------------------------


def is_adapter_container(attr: str) -> bool:
    """An attribute of a LoRA layer that holds one entry per adapter (``lora_A``, ``lora_dropout``, …)."""
    return bool(_CONTAINER.match(attr))


def is_adapter_tensor(key: str) -> bool:
    """A model state-dict key owned by an adapter (its factors, its copy of a module), not the base's."""
    return bool(_ADAPTER_TENSOR.search(key))


def is_wrapper_module(name: str) -> bool:
    """A module name inside lorakit's (and PEFT's) wrappers (``…q_proj.base_layer``, ``…lora_A.x``), which
    no target list means."""
    return bool(_WRAPPER_MODULE.search(name))


# -- keys ----------------------------------------------------------------------------------------


def with_prefix(key: str) -> str:
    """``base_model.model.`` + ``key``: the file key of a base tensor saved as is (trained biases)."""
    return PREFIX + key


def without_prefix(key: str) -> str:
    """A file key without ``base_model.model.`` (keys written without it, seen in the wild, stay as they are)."""
    return key[len(PREFIX):] if key.startswith(PREFIX) else key


def file_key(model_key: str, name: str) -> str | None:
    """The file key of ``model_key`` if adapter ``name`` owns it (its factors or its copy of a module),
    else None."""
    tag = re.escape(name)
    part = re.compile(rf"\.({_PARTS_RE})\.{tag}(\.|$)")
    if part.search(model_key):
        key = part.sub(r".\1\2", model_key)
        return with_prefix(key.removesuffix(".weight") if key.endswith(".lora_magnitude_vector.weight") else key)
    copy = f"{MODULES_TO_SAVE}.{name}."
    if f".{copy}" in model_key or model_key.startswith(copy):
        return with_prefix(model_key.replace(copy, ""))
    return None


def split_file_key(key: str) -> tuple[str, str] | None:
    """``(module, part)`` of a file key that holds a LoRA part (``lora_A``, ``lora_B``, ``lora_B.bias``,
    ``lora_embedding_A``/``_B``, ``lora_magnitude_vector``), else None. The prefix may be absent."""
    bare = without_prefix(key)
    for suffix, part in _FILE_PARTS.items():
        if bare.endswith(suffix) and len(bare) > len(suffix):
            return bare[: -len(suffix)], part
    return None


def part_file_key(module: str, part: str) -> str:
    """The file key of ``part`` of ``module`` (the inverse of :func:`split_file_key`)."""
    suffix = next((suffix for suffix, p in _FILE_PARTS.items() if p == part), None)
    if suffix is None:
        raise ValueError(f"unknown adapter part {part!r}")
    return with_prefix(module + suffix)


def module_of(model_key: str) -> str:
    """The adapted module a model key belongs to (``….q_proj`` for ``….q_proj.lora_A.default.weight``)."""
    return re.sub(rf"\.({_PARTS_RE}|{MODULES_TO_SAVE})\..*$", "", model_key)


# -- scale ---------------------------------------------------------------------------------------


def scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """LoRA's ``s``: ``alpha / r``, or ``alpha / √r`` with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def module_scaling(config: LoraConfig, module: str, r: int | None = None) -> float:
    """``s`` of ``module`` under ``config`` (rank/alpha patterns applied); ``r`` overrides the rank
    (the rank a file's tensors have)."""
    return scaling(config.alpha_for(module), config.rank_for(module) if r is None else r, config.use_rslora)


# -- target parameters ---------------------------------------------------------------------------

# Weights of an experts module in the order transformers registers them (first = innermost wrapper).
_EXPERT_ORDER = ("gate_up_proj", "up_proj", "down_proj")


def nest_module(name: str) -> str:
    """The module a nest of parameter wrappers stands for: ``….experts`` for ``….experts.base_layer``
    (file modules and wrapper names alike)."""
    return re.sub(r"(\.base_layer)+$", "", name)


def file_parameters(modules: list[str], target_parameters: list[str] | None) -> dict[str, str]:
    """Which targeted parameter each file module holds, read from the layout alone (no model).

    A file module ``….experts.base_layer`` (one ``base_layer`` per further parameter of the same
    module) maps to the parameter's full key (``….experts.gate_up_proj``); the innermost holds the
    module's first parameter, which for transformers' experts is ``gate_up_proj`` (or ``up_proj``)
    before ``down_proj`` — the order vLLM also assumes. Modules that are no target parameter, or
    whose parameter cannot be told, are left out.

    Args:
        modules: the file's module names (as :func:`split_file_key` gives them).
        target_parameters: the config's ``target_parameters``.

    Returns:
        file module -> the parameter's full name (``model.layers.0.mlp.experts.down_proj``).
    """
    if not target_parameters:
        return {}
    nests: dict[str, list[tuple[int, str]]] = {}
    for module in modules:
        outer = nest_module(module)
        depth = (len(module) - len(outer)) // len(".base_layer")
        nests.setdefault(outer, []).append((depth, module))
    found = {}
    for outer, members in nests.items():
        # Candidate parameters: targets that name a parameter of this module, the most specific first
        # (``gate.weight`` says more about ``….mlp.gate`` than a bare ``down_proj`` does).
        scores: dict[str, int] = {}
        for t in target_parameters:
            leaf = t.rsplit(".", 1)[-1]
            key = f"{outer}.{leaf}"
            if key == t or key.endswith("." + t):
                scores[leaf] = max(scores.get(leaf, 0), t.count(".") + 1)
        ranked = sorted(scores, key=lambda leaf: -scores[leaf])
        if len(ranked) < len(members) or (len(ranked) > len(members)
                                          and scores[ranked[len(members) - 1]] == scores[ranked[len(members)]]):
            continue
        leaves = sorted(ranked[:len(members)],
                        key=lambda leaf: (_EXPERT_ORDER.index(leaf) if leaf in _EXPERT_ORDER else 1.5, leaf))
        for depth, module in members:
            found[module] = f"{outer}.{leaves[len(leaves) - 1 - depth]}"
    return found


def parameter_rank(config: LoraConfig, parameter: str | None, rows: int) -> tuple[int, int]:
    """``(rank, experts)`` of a module whose ``lora_A`` has ``rows`` rows: for a target parameter, the
    config's rank for it and ``rows / rank`` experts (1 for a 2-D weight such as a router's); for a
    module (``parameter`` None) or rows that are no multiple of that rank, ``(rows, 1)``."""
    if parameter is None:
        return rows, 1
    rank = config.rank_for(parameter)
    return (rank, rows // rank) if rows % rank == 0 else (rows, 1)


# -- folders -------------------------------------------------------------------------------------


def adapter_folder(folder: str | Path, name: str) -> Path:
    """Where adapter ``name`` lives in a folder of several: ``default`` at the top, others in ``folder/<name>``."""
    return Path(folder) if name == "default" else Path(folder) / name


def adapter_folders(folder: str | Path) -> list[tuple[str, Path]]:
    """``(name, folder)`` of every adapter in ``folder``: ``default`` at the top if it has a config, then
    each sub-folder that has one, by name. Empty if there is none (or no such folder)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [("default", folder)] if (folder / CONFIG_NAME).is_file() else []
    found += [(sub.name, sub) for sub in sorted(folder.iterdir()) if (sub / CONFIG_NAME).is_file()]
    return found


# -- reading -------------------------------------------------------------------------------------


def read_tensors(folder: str | Path, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter file's tensors (on CPU, by file key) and the path they came from.

    Raises:
        LorakitError: no weights file, a truncated/corrupt one, or a pickle file without ``allow_pickle``.
    """
    folder = Path(folder)
    path = folder / WEIGHTS_NAME
    if path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(path), path
        except Exception as err:  # safetensors raises its own error type for bad headers/sizes
            raise LorakitError(
                f"{path}: not a readable safetensors file ({err}); it is truncated or corrupt — "
                "save or copy the adapter again"
            ) from None
    path = folder / PICKLE_WEIGHTS_NAME
    if path.is_file():
        if not allow_pickle:
            raise LorakitError(
                f"{path}: a pickle file, refused because unpickling can run arbitrary code; convert it "
                "to safetensors, or opt in with allow_pickle=True (CLI: --allow-pickle) to read it "
                "with torch.load(weights_only=True)"
            )
        try:
            return torch.load(path, map_location="cpu", weights_only=True), path
        except Exception as err:
            raise LorakitError(f"{path}: cannot be loaded safely (weights_only=True): {err}") from None
    raise LorakitError(f"{folder}: no {WEIGHTS_NAME} (nor {PICKLE_WEIGHTS_NAME}) in this folder")


def read_shapes(folder: str | Path) -> tuple[dict[str, tuple[int, ...]], Path]:
    """Every tensor's shape by file key, from the safetensors header alone (no tensor is read)."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_NAME
    if not path.is_file():
        pickle = Path(folder) / PICKLE_WEIGHTS_NAME
        if pickle.is_file():
            raise LorakitError(f"{pickle}: a pickle file; lorakit reads safetensors adapters only (convert it: "
                               f"load it with torch.load(weights_only=True) and save {WEIGHTS_NAME})")
        raise LorakitError(f"{path}: missing (lorakit reads safetensors adapters only)")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, path
    except Exception as err:
        raise LorakitError(f"{path}: not a readable safetensors file ({err})") from None


@dataclass
class AdapterFile:
    """An adapter folder as read: its config, and its tensors grouped by module."""

    config: LoraConfig
    source: Path
    """The tensor file."""
    modules: dict[str, dict[str, torch.Tensor]]
    """module name -> part (see :func:`split_file_key`) -> tensor, in file order."""
    other: dict[str, torch.Tensor]
    """Tensors that are no LoRA part, by file key as written: ``modules_to_save`` copies, trained base
    biases, embedding weights."""


def read_adapter(folder: str | Path, allow_pickle: bool = False, config: LoraConfig | None = None) -> AdapterFile:
    """Read the adapter in ``folder``: config (unless given) and tensors by module.

    Raises:
        LorakitError: the folder, the config or the tensor file is missing or unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LorakitError(f"adapter folder {folder} does not exist")
    config = LoraConfig.load(folder) if config is None else config
    tensors, source = read_tensors(folder, allow_pickle=allow_pickle)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        split = split_file_key(key)
        if split is None:
            other[key] = tensor
        else:
            modules.setdefault(split[0], {})[split[1]] = tensor
    return AdapterFile(config, source, modules, other)


@dataclass
class Factors:
    """One adapter's update of one module: ``ΔW = scale · B @ A``.

    Linear layers: A (r, in), B (out, r). Embeddings keep PEFT's layout, A (r, vocab), B (dim, r),
    whose product is ΔWᵀ.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    bias: torch.Tensor | None = None
    """``lora_B.bias`` as stored (the update adds ``scale · bias``)."""
    embedding: bool = False
    magnitude: torch.Tensor | None = None
    """DoRA's m (out,), for a DoRA adapter."""
    experts: int = 1
    """E for an expert weight (target_parameters on (E, out, in)): A (r·E, in), B (out, r·E)."""
    parameter: str | None = None
    """The targeted parameter's full name (target_parameters), whose rank/alpha patterns apply."""

    @property
    def rank(self) -> int:
        """The rank (per expert for an expert weight)."""
        return self.A.shape[0] // self.experts

    def expert(self, e: int) -> Factors:
        """Expert ``e``'s own factors: ``A[e·r:(e+1)·r]`` (r, in) and ``B[:, e::E]`` (out, r)."""
        r = self.rank
        return Factors(self.A[e * r:(e + 1) * r], self.B[:, e::self.experts], self.scale)

    def delta(self) -> torch.Tensor:
        """``scale · B @ A`` in fp64."""
        return (self.B.double() @ self.A.double()) * self.scale


def read_factors(folder: str | Path, allow_pickle: bool = False) -> tuple[LoraConfig, dict[str, Factors]]:
    """An adapter folder's config and its factors by module, fp32, each with its scale from the config
    (the rank is the one the tensors have; per expert for expert weights).

    Raises:
        LorakitError: as :func:`read_adapter`, or a module whose A and B do not fit together.
    """
    file = read_adapter(folder, allow_pickle=allow_pickle)
    parameters = file_parameters(list(file.modules), file.config.target_parameters)
    factors: dict[str, Factors] = {}
    for module, parts in file.modules.items():
        for a_part, b_part, embedding in (("lora_A", "lora_B", False), ("lora_embedding_A", "lora_embedding_B", True)):
            if a_part not in parts:
                continue
            A, B = parts[a_part], parts.get(b_part)
            if B is None or A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
                raise LorakitError(f"{file.source}: {module} has lora A {tuple(A.shape)} but lora B "
                                   f"{None if B is None else tuple(B.shape)}; the file is inconsistent")
            parameter = parameters.get(module)
            rank, experts = parameter_rank(file.config, parameter, A.shape[0])
            factors[module] = Factors(A.float(), B.float(), module_scaling(file.config, parameter or module, rank),
                                      parts.get("lora_B.bias"), embedding, parts.get("lora_magnitude_vector"),
                                      experts, parameter)
    return file.config, factors
