"""The Spectrum report: a ranked table per module type, and a training-config fragment."""

from __future__ import annotations

from lorakit.spectrum.ranking import MatrixSnr, select, selected_modules


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
