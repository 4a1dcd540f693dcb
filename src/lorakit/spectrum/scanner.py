"""The Spectrum scan: the SNR of every per-layer 2-D weight of a safetensors model folder.

- It streams: safetensors shards are memory-mapped and read one 2-D tensor at a time, so a model
  larger than RAM still scans; the SVDs run on one torch thread by default.
- Results are cached per model (JSON under ``<cache>/spectrum/``), keyed by the weight files'
  identity (name, size, mtime) and the version of the SNR definition.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import safetensors

from lorakit._fs import atomic_write_text
from lorakit.errors import LorakitError
from lorakit._fs import cache_dir
from lorakit.spectrum.ranking import MatrixSnr, is_expert_weight, module_type, snr_from_singular_values, svdvals

_CACHE_VERSION = 2  # bump when the SNR definition or the ranked set changes: old cache entries are then ignored

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


def _shard_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise LorakitError(f"{folder}: no *.safetensors weights to scan (Spectrum reads safetensors only)")
    return files


def excluded_experts(folder: str | Path) -> int:
    """How many routed-expert tensors of a safetensors model folder Spectrum leaves unranked."""
    count = 0
    for f in _shard_files(Path(folder)):
        with safetensors.safe_open(f, framework="pt") as sf:
            count += sum(is_expert_weight(name) for name in sf.keys())
    return count


def model_fingerprint(folder: str | Path) -> str:
    """A cache key for a model folder: hash of each weight file's name, size and mtime."""
    h = hashlib.sha256(f"spectrum-v{_CACHE_VERSION}".encode())
    for f in _shard_files(Path(folder)):
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def default_cache_dir() -> Path:
    """Where scans are cached: :func:`lorakit._fs.cache_dir` (``$LORAKIT_CACHE`` or ~/.cache/lorakit)."""
    return cache_dir()


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
    folder = Path(folder)
    cache_file = Path(cache_dir or default_cache_dir()) / "spectrum" / f"{model_fingerprint(folder)}.json"
    if use_cache and cache_file.is_file():
        return [MatrixSnr(**{**r, "shape": tuple(r["shape"])}) for r in json.loads(cache_file.read_text())]
    todo: list[tuple[Path, str, str, int]] = []
    for f in _shard_files(folder):
        try:
            with safetensors.safe_open(f, framework="pt") as sf:
                for name in sf.keys():
                    kind = module_type(name)
                    if kind is not None and len(sf.get_slice(name).get_shape()) == 2 and not is_expert_weight(name):
                        todo.append((f, name, *kind))
        except Exception as err:  # safetensors' own error type for a truncated or corrupt header
            raise LorakitError(f"{f}: not a readable safetensors file ({err}); it is truncated or corrupt — "
                               "copy or download the model again") from None
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
    results: list[MatrixSnr] = []
    for file, group in _by_file(todo):
        with safetensors.safe_open(file, framework="pt") as sf:
            for _, name, kind, layer in group:
                w = sf.get_tensor(name)  # one tensor read from the memory map
                try:
                    stats = snr_from_singular_values(svdvals(w), tuple(w.shape))
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
