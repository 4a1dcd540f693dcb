"""Spectrum's signal-to-noise ratio of a weight matrix, and the selection it drives.

Spectrum (Hartford et al. 2024, "Spectrum: Targeted Training on Signal to Noise Ratio") treats
each weight matrix's singular values as a Marchenko–Pastur noise bulk plus signal above it:

    S = svdvals(W)                      # fp32, descending
    σ = IQR(S) / 1.349                  # robust noise scale (1.349 = IQR of a unit normal)
    threshold = σ · (1 + √β),  β = min(m, n) / max(m, n)
    SNR = (Σ S > threshold) / (Σ S ≤ threshold, or 1 if none) / max(S)

Matrices are grouped by module type (the name after the layer index, ``mlp.down_proj``) and the
top ``int(len · pct / 100)`` of each group by SNR are selected (:func:`select`). Pure functions: a
zero or non-finite matrix raises instead of turning into NaN.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from lorakit.errors import LorakitError

_LAYER = re.compile(r"^(?P<prefix>.*?)\.(?P<index>\d+)\.(?P<rest>.+)\.weight$")


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
    return snr_from_singular_values(svdvals(weight), tuple(weight.shape))["snr"]


def svdvals(weight: torch.Tensor) -> torch.Tensor:
    """The singular values of a 2-D weight (fp32 SVD of its tall orientation).

    Raises:
        ValueError: the matrix holds NaN or inf values.
    """
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


def is_expert_weight(name: str) -> bool:
    """A routed expert's weight in a checkpoint: per expert (``….mlp.experts.7.down_proj.weight``, how
    transformers saves MoE models) or fused (``….mlp.experts.down_proj``, 3-D).

    Spectrum does not rank these: the model trains an MoE layer's experts as 3-D tensors (all
    experts of a layer at once), which a per-matrix selection cannot express. Adapt them with
    LoRA on ``target_parameters`` instead. Shared experts (``shared_expert(s)``) are ordinary
    linear layers and are ranked.
    """
    return bool(re.search(r"(^|\.)experts\.(\d+\.)?[^.]+(\.weight)?$", name))


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
