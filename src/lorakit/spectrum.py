"""Spectrum: rank weight matrices by signal-to-noise ratio and train only the best ones.

Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to Noise Ratio") treats
each weight matrix's singular values as a Marchenko–Pastur noise bulk plus signal above it:

    S = svdvals(W)                      # fp32, descending
    σ = IQR(S) / 1.349                  # robust noise scale (1.349 = IQR of a unit normal)
    threshold = σ · (1 + √β),  β = min(m, n) / max(m, n)
    SNR = (Σ S > threshold) / (Σ S ≤ threshold, or 1 if none) / max(S)

Matrices are grouped by module type (the name after the layer index, ``mlp.down_proj``) and the
top ``int(len · pct / 100)`` of each group by SNR are selected. Notable here:

- :func:`snr` is a pure function; a zero or non-finite matrix raises instead of turning into NaN.
- :func:`scan` streams: safetensors shards are memory-mapped and read one 2-D tensor at a time,
  so a model larger than RAM still scans. Results are cached per model, keyed by the files'
  identity (name, size, mtime).
- Two ways to train with the selection: :func:`selected_modules` gives LoRA target names
  (``targets: spectrum:25``); :func:`freeze_for_spectrum` / :func:`save_spectrum` /
  :func:`load_spectrum` implement ``method: spectrum`` (full training of those tensors only).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorakit._fs import atomic_write_text
from lorakit.errors import LorakitError

CONFIG_NAME = "spectrum_config.json"
WEIGHTS_NAME = "spectrum_model.safetensors"
_CACHE_VERSION = 1  # bump when the SNR definition changes: old cache entries are then ignored
_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)\.weight$")

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


@dataclass(frozen=True)
class MatrixSnr:
    """The scan result for one 2-D weight tensor.

    Attributes:
        name: the tensor name in the checkpoint, e.g. ``model.layers.3.mlp.down_proj.weight``.
        module_type: the group it competes in, e.g. ``mlp.down_proj``.
        layer: the layer index.
        shape: (rows, cols) as stored.
        snr: the Spectrum signal-to-noise ratio (see module docstring).
        sigma: the noise scale IQR(S)/1.349.
        threshold: σ·(1 + √β); singular values above it count as signal.
        max_sv: the largest singular value.
        n_signal: how many singular values lie above the threshold.
    """

    name: str
    module_type: str
    layer: int
    shape: tuple[int, int]
    snr: float
    sigma: float
    threshold: float
    max_sv: float
    n_signal: int


# ----------------------------------------------------------------------------- the math


def snr_from_singular_values(s: torch.Tensor, shape: tuple[int, int]) -> dict[str, float]:
    """Spectrum's SNR from the singular values of an (m, n) matrix.

    Args:
        s: the singular values, any order, 1-D.
        shape: (m, n) of the matrix they came from (for β = min/max).

    Returns:
        ``{"snr", "sigma", "threshold", "max_sv", "n_signal"}``.

    Raises:
        ValueError: ``s`` is empty, non-finite, or all zero (the ratio is undefined).
    """
    s = s.detach().to(torch.float64).flatten()
    if s.numel() == 0 or not bool(torch.isfinite(s).all()):
        raise ValueError("singular values are empty or not finite")
    max_sv = float(s.max())
    if max_sv <= 0.0:
        raise ValueError("matrix is all zeros: its SNR is undefined")
    q1, q3 = torch.quantile(s, torch.tensor([0.25, 0.75], dtype=s.dtype)).tolist()
    sigma = (q3 - q1) / 1.349
    beta = min(shape) / max(shape)
    threshold = sigma * (1.0 + math.sqrt(beta))
    above = s > threshold
    signal = float(s[above].sum())
    noise = float(s[~above].sum()) if bool((~above).any()) else 1.0
    if noise == 0.0:  # every value at or below the threshold is exactly zero
        noise = 1.0
    return {"snr": signal / noise / max_sv, "sigma": sigma, "threshold": threshold,
            "max_sv": max_sv, "n_signal": int(above.sum())}


def snr(weight: torch.Tensor) -> float:
    """Spectrum's signal-to-noise ratio of one 2-D weight matrix (fp32 SVD).

    Raises:
        ValueError: the tensor is not 2-D, is all zeros, or holds NaN/inf.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    return snr_from_singular_values(_svdvals(weight), tuple(weight.shape))["snr"]


def _svdvals(weight: torch.Tensor) -> torch.Tensor:
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("matrix holds NaN or inf values")
    return torch.linalg.svdvals(w.T if w.shape[0] < w.shape[1] else w)  # same values; tall is ≈2× faster


def module_type(name: str) -> tuple[str, int] | None:
    """``(module type, layer index)`` of a per-layer 2-D weight name, or None outside the layers.

    Further numeric indices (MoE experts) become ``*`` so that all experts form one group:
    ``model.layers.3.mlp.experts.7.down_proj.weight`` -> ``("mlp.experts.*.down_proj", 3)``.
    """
    match = _LAYER.match(name)
    if match is None:
        return None
    rest = re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", match["rest"])
    return rest, int(match["index"])


def select(results: Iterable[MatrixSnr], top: float) -> list[MatrixSnr]:
    """The top ``int(len · top / 100)`` matrices by SNR in each module type, in name order.

    Args:
        results: scan results.
        top: the percentage to keep per module type, 0–100.

    Raises:
        LorakitError: ``top`` is outside 0–100.
    """
    if not 0.0 <= top <= 100.0:
        raise LorakitError(f"--top {top}: expected a percentage between 0 and 100 (paper default 25)")
    groups: dict[str, list[MatrixSnr]] = {}
    for r in results:
        groups.setdefault(r.module_type, []).append(r)
    chosen: list[MatrixSnr] = []
    for members in groups.values():
        ranked = sorted(members, key=lambda r: (-r.snr, r.layer))
        chosen += ranked[: int(len(members) * top / 100)]
    return sorted(chosen, key=lambda r: (r.layer, r.name))


def selected_modules(results: Iterable[MatrixSnr], top: float) -> list[str]:
    """Full module names of the selection (``….mlp.down_proj``): LoRA targets for ``spectrum:N``."""
    return [r.name.removesuffix(".weight") for r in select(results, top)]


# ----------------------------------------------------------------------------- the scan


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorakitError(f"{folder}: no *.safetensors weights to scan (Spectrum reads safetensors only)")
    return files


def model_fingerprint(folder: str | Path) -> str:
    """A cache key for a model folder: hash of each weight file's name, size and mtime."""
    h = hashlib.sha256(f"spectrum-v{_CACHE_VERSION}".encode())
    for f in _shard_files(Path(folder)):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    """``lorakit.models.cache_dir()`` when available, else ``$LORAKIT_CACHE`` or ~/.cache/lorakit."""
    try:
        from lorakit.models import cache_dir  # type: ignore[attr-defined]
    except ImportError:
        return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")
    return Path(cache_dir())


def scan(folder: str | Path, *, progress: Progress | None = None, cache_dir: str | Path | None = None,
         use_cache: bool = True, threads: int | None = 1) -> list[MatrixSnr]:
    """SNR of every per-layer 2-D weight of a safetensors model folder, streamed tensor by tensor.

    Only one tensor is in memory at a time (plus its fp32 copy and the SVD workspace); shards are
    memory-mapped. Embeddings and the output head sit outside the layers and are not ranked.

    Args:
        folder: a model folder with ``*.safetensors`` (use ``lorakit.models.resolve`` for aliases).
        progress: called as ``progress(done, total, name)`` after each matrix.
        cache_dir: where results are cached (default :func:`default_cache_dir`).
        use_cache: read and write the cache.
        threads: torch threads during the SVDs, restored after; None keeps the current setting.
            One thread is the default because per-matrix LAPACK threading is 3–4× slower on
            busy 2-core machines (SmolLM2: 7 s vs 27 s); raise it for 8k-wide matrices.

    Returns:
        One :class:`MatrixSnr` per matrix, in checkpoint order (layer, then name).

    Raises:
        LorakitError: no safetensors files, no per-layer 2-D weights, or a degenerate matrix.
    """
    from safetensors import safe_open

    folder = Path(folder)
    cache_file = Path(cache_dir or default_cache_dir()) / "spectrum" / f"{model_fingerprint(folder)}.json"
    if use_cache and cache_file.is_file():
        return [MatrixSnr(**{**r, "shape": tuple(r["shape"])}) for r in json.loads(cache_file.read_text())]
    todo: list[tuple[Path, str, str, int]] = []
    for f in _shard_files(folder):
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                kind = module_type(name)
                if kind is not None and len(sf.get_slice(name).get_shape()) == 2:
                    todo.append((f, name, *kind))
    if not todo:
        raise LorakitError(f"{folder}: no per-layer 2-D weights (names like model.layers.N.….weight) to rank")
    todo.sort(key=lambda t: (t[3], t[1]))
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        results = _scan_files(todo, progress)
    finally:
        torch.set_num_threads(before)
    if use_cache:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cache_file, json.dumps([asdict(r) for r in results]))
    return results


def _scan_files(todo: list[tuple[Path, str, str, int]], progress: Progress | None) -> list[MatrixSnr]:
    from safetensors import safe_open

    results: list[MatrixSnr] = []
    for file, group in _by_file(todo):
        with safe_open(file, framework="pt") as sf:
            for _, name, kind, layer in group:
                w = sf.get_tensor(name)  # one tensor read from the memory map
                try:
                    stats = snr_from_singular_values(_svdvals(w), tuple(w.shape))
                except ValueError as err:
                    raise LorakitError(f"{file}: tensor {name}: {err}") from err
                results.append(MatrixSnr(name, kind, layer, tuple(w.shape), **stats))
                del w
                if progress is not None:
                    progress(len(results), len(todo), name)
    return sorted(results, key=lambda r: (r.layer, r.name))


def _by_file(todo: list[tuple[Path, str, str, int]]) -> list[tuple[Path, list[tuple[Path, str, str, int]]]]:
    # Open each shard once, keeping the (layer, name) order within it.
    grouped: dict[Path, list[tuple[Path, str, str, int]]] = {}
    for item in todo:
        grouped.setdefault(item[0], []).append(item)
    return list(grouped.items())


# ----------------------------------------------------------------------------- reporting


def format_table(results: list[MatrixSnr], top: float) -> str:
    """A ranked table per module type; selected rows are marked with ``*``."""
    chosen = {r.name for r in select(results, top)}
    groups: dict[str, list[MatrixSnr]] = {}
    for r in results:
        groups.setdefault(r.module_type, []).append(r)
    lines: list[str] = []
    for kind, members in groups.items():
        keep = int(len(members) * top / 100)
        lines.append(f"{kind}  ({keep} of {len(members)} selected, shape {members[0].shape[0]}×{members[0].shape[1]})")
        lines.append(f"  {'rank':>4}  {'layer':>5}  {'SNR':>10}  {'signal SVs':>10}  {'max SV':>9}")
        for rank, r in enumerate(sorted(members, key=lambda r: (-r.snr, r.layer)), 1):
            mark = "*" if r.name in chosen else " "
            lines.append(f"{mark} {rank:>4}  {r.layer:>5}  {r.snr:>10.6f}  {r.n_signal:>10}  {r.max_sv:>9.3f}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def yaml_snippet(results: list[MatrixSnr], top: float, model: str) -> str:
    """A training-config fragment: ``method: spectrum`` with the tensors, and the LoRA alternative."""
    modules = selected_modules(results, top)
    body = "\n".join(f"    - {m}" for m in modules) or "    []"
    return (f"# Spectrum selection for {model}: top {top:g}% per module type ({len(modules)} matrices)\n"
            f"adapter:\n"
            f"  method: spectrum   # train these fully (+ embeddings and head); or lora: LoRA on them only\n"
            f"  targets:           # the same as `targets: spectrum:{top:g}` for this model\n{body}\n")


# ----------------------------------------------------------------------------- training


def _embedding_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    found: dict[str, torch.nn.Parameter] = {}
    by_id = {id(p): n for n, p in model.named_parameters()}  # tied weights appear once
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and id(weight) in by_id:
            found[by_id[id(weight)]] = weight
    return found


def freeze_for_spectrum(model: torch.nn.Module, modules: Iterable[str], *, train_embeddings: bool = True) -> list[str]:
    """Freeze every parameter except the selected modules' weights, in place.

    Args:
        model: the base model.
        modules: full module names from :func:`selected_modules` (``….mlp.down_proj``).
        train_embeddings: also train the input embeddings and the output head, as the reference
            Spectrum does (default). With tied embeddings they are one tensor.

    Returns:
        The names of the parameters left trainable, sorted.

    Raises:
        LorakitError: a module name does not exist or has no 2-D weight.
    """
    params = dict(model.named_parameters())
    wanted: dict[str, torch.nn.Parameter] = {}
    for module in modules:
        name = f"{module}.weight"
        if name not in params or params[name].dim() != 2:
            raise LorakitError(f"spectrum: module {module!r} has no 2-D weight in this model; "
                               "was the selection made for a different model?")
        wanted[name] = params[name]
    if train_embeddings:
        wanted.update(_embedding_params(model))
    keep = {id(p) for p in wanted.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return sorted(wanted)


def mark_spectrum(model: torch.nn.Module, *, base_model: str | None, top: float | None) -> None:
    """Record on ``model`` that its trainable tensors are a Spectrum selection.

    Training's checkpoints then save them with :func:`save_spectrum` (see :func:`spectrum_info`).
    """
    model.__dict__["lorakit_spectrum"] = {"base_model": base_model, "top": top}


def spectrum_info(model: torch.nn.Module) -> dict | None:
    """What :func:`mark_spectrum` recorded, or None for a model trained with adapters."""
    return model.__dict__.get("lorakit_spectrum")


def save_spectrum(model: torch.nn.Module, out_dir: str | Path, *, base_model: str | None = None,
                  top: float | None = None) -> Path:
    """Write the trainable tensors as ``spectrum_model.safetensors`` plus ``spectrum_config.json``.

    Only parameters with ``requires_grad`` are written (what :func:`freeze_for_spectrum` left
    trainable), so the file is small: the selection, not the model.

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise LorakitError("spectrum: no trainable parameters to save; call freeze_for_spectrum first")
    tensors = {n: p.detach().contiguous().cpu() for n, p in trainable.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    config = {"method": "spectrum", "base_model_name_or_path": base_model, "top_percent": top,
              "tensors": sorted(tensors), "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch.")}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def load_spectrum(model: torch.nn.Module, folder: str | Path) -> list[str]:
    """Copy the tensors of a saved Spectrum run into ``model`` in place (any dtype/device).

    Returns:
        The names of the tensors applied.

    Raises:
        LorakitError: files missing, a tensor the model lacks, or a shape that does not fit.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    for needed in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / needed).is_file():
            raise LorakitError(f"{folder}: no {needed}; expected a folder written by save_spectrum")
    tensors = load_file(str(folder / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params:
            raise LorakitError(f"{folder / WEIGHTS_NAME}: tensor {name!r} is not a parameter of this model")
        if tuple(params[name].shape) != tuple(t.shape):
            raise LorakitError(f"{folder / WEIGHTS_NAME}: {name} has shape {tuple(t.shape)}, "
                               f"the model's is {tuple(params[name].shape)}; is it the same base model?")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    return sorted(tensors)
