"""``lorakit inspect DIR``: what an adapter folder holds, read from its headers only.

Ranks, alpha, targets, variant, parameter count, file size, base model, and whether vLLM's
default ``--max-lora-rank`` (16) accepts it. Multi-adapter folders list each adapter.

``--for vllm|lorax`` checks what that server needs (rank limit, no DoRA / ``modules_to_save`` /
trained biases for vLLM, and for expert LoRA whether vLLM reads PEFT's fused layout for the base
model's architecture; known target modules for LoRAX) and exits 1 when the adapter would be
refused or do nothing there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

VLLM_FUSED_EXPERT_LORA = frozenset({  # vLLM model classes with is_3d_moe_weight = True (vllm/model_executor/models)
    "GptOssForCausalLM", "Qwen3_5MoeForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
    "Glm4MoeLiteForCausalLM", "InternS1ProForConditionalGeneration"})
"""Architectures for which vLLM reads expert LoRA in PEFT's fused 3-D layout; for every other MoE
model its expert LoRA expects one 2-D adapter per expert (``experts.<e>.gate_proj`` …)."""
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank``."""
LORAX_MODULES = frozenset({  # LoRAX's documented target modules over its architectures
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head", "qkv_proj",
    "gate_up_proj", "dense", "fc1", "fc2", "c_attn", "c_proj", "c_fc", "w1", "w2", "Wqkv", "out_proj",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h"})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="DIR", help="an adapter folder (PEFT format)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--for", dest="server", choices=("vllm", "lorax"),
                        help="check that this server can load the adapter as is (exit 1 if not)")


def run(args: argparse.Namespace) -> int:
    reports = inspect_folder(Path(args.folder))
    if args.server:
        for report in reports:
            report["serving"] = serving_check(report, args.server)
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2))
    else:
        print("\n\n".join(_format(r) for r in reports))
    return 1 if any(r.get("serving", {}).get("problems") for r in reports) else 0


def serving_check(report: dict[str, Any], server: str) -> dict[str, Any]:
    """What stops ``server`` (``vllm`` or ``lorax``) from serving the adapter as is, and what to pass it.

    Returns:
        ``{"server", "ok", "problems", "notes"}``: problems make the server refuse the adapter
        (or ignore all of it); notes are flags to set or parts it will skip.
    """
    problems, notes = [], []
    max_rank = max(report["ranks"], default=0)
    if server == "vllm":
        if max_rank > VLLM_MAX_LORA_RANKS[-1]:
            problems.append(f"rank {max_rank} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
        elif max_rank > VLLM_DEFAULT_MAX_LORA_RANK:
            needed = next(r for r in VLLM_MAX_LORA_RANKS if r >= max_rank)
            notes.append(f"start vLLM with --max-lora-rank {needed} (default {VLLM_DEFAULT_MAX_LORA_RANK})")
        if report["variant"].endswith("DoRA"):
            problems.append("vLLM does not serve DoRA adapters: merge it (lorakit merge) and serve the merged model")
        if report["modules_to_save"]:
            problems.append(f"vLLM refuses modules_to_save ({', '.join(report['modules_to_save'])}): merge instead")
        if report.get("bias", "none") != "none" or report.get("lora_bias"):
            problems.append("trained biases: vLLM refuses them (or needs --enable-lora-bias); train with bias: none")
        if report.get("expert_targets"):
            _vllm_experts(report, problems, notes)
    else:
        unknown = [t for t in report["targets"] if t not in LORAX_MODULES]
        if unknown and len(unknown) == len(report["targets"]):
            problems.append(f"LoRAX supports none of the adapted modules ({', '.join(unknown)}): it would ignore them all")
        elif unknown:
            notes.append(f"LoRAX ignores modules it does not support ({', '.join(unknown)}), with a warning")
        if report["modules_to_save"]:
            notes.append("modules_to_save may be ignored by LoRAX: merge to be safe")
        if report["variant"].endswith("DoRA"):
            notes.append("DoRA: check that your LoRAX version serves it, or merge")
    return {"server": server, "ok": not problems, "problems": problems, "notes": notes}


def _vllm_experts(report: dict[str, Any], problems: list[str], notes: list[str]) -> None:
    """What vLLM makes of expert LoRA in PEFT's fused layout (``….experts.base_layer`` = gate_up_proj,
    ``….experts`` = down_proj, A (r·E, in), B (out, r·E)), for the base model's architecture."""
    layout = (f"expert LoRA on {', '.join(report['expert_targets'])} ({report['experts']} experts) in PEFT's fused "
              "3-D layout")
    arch = report.get("base_architecture")
    needs = "vLLM's FusedMoE LoRA (0.11.2 or later) without expert parallelism"
    if arch in VLLM_FUSED_EXPERT_LORA:
        notes.append(f"{layout}: vLLM reads this layout for {arch} (a model it keeps with fused experts); needs {needs}")
        return
    per_expert = ("vLLM expects per-expert 2-D LoRA for it (….experts.<e>.gate_proj / up_proj / down_proj, every "
                  "expert) unless started with --enable-mixed-moe-lora-format and the adapter declared is_3d_lora_weight "
                  "(recent vLLM); lorakit does not write the per-expert layout — merge (lorakit merge) and serve the "
                  "merged model, or serve the adapter with lorakit serve")
    if arch is None:
        notes.append(f"{layout}: vLLM reads it as is only for models it keeps with fused experts "
                     f"({', '.join(sorted(VLLM_FUSED_EXPERT_LORA))}); for other MoE models {per_expert}. The base "
                     "model's architecture is not known here (base_model_name_or_path is no local folder)")
    else:
        problems.append(f"{layout}: {arch} is not one of the models vLLM keeps with fused experts; {per_expert}")


def inspect_folder(folder: Path) -> list[dict[str, Any]]:
    """One report per adapter in ``folder`` (``default`` at the top, others in sub-folders)."""
    from lorakit.adapters.peft_format import CONFIG_NAME, adapter_folders
    from lorakit.errors import LorakitError

    if not folder.is_dir():
        raise LorakitError(f"{folder} is not a folder")
    found = adapter_folders(folder)
    if not found:
        raise LorakitError(f"{folder}: no {CONFIG_NAME} here or in its sub-folders; not an adapter folder")
    return [inspect_adapter(name, path) for name, path in found]


def inspect_adapter(name: str, folder: Path) -> dict[str, Any]:
    """Facts about one adapter folder, from its config and the safetensors header."""
    from lorakit.adapters.config import LoraConfig
    from lorakit.adapters.peft_format import file_parameters, parameter_rank, read_shapes, split_file_key

    config = LoraConfig.load(folder)
    shapes, path = read_shapes(folder)
    parts = {key: split for key in shapes if (split := split_file_key(key)) is not None}  # key -> (module, part)
    modules = sorted({module for module, _ in parts.values()})
    parameters = file_parameters(modules, config.target_parameters)  # file module -> targeted parameter
    ranks, experts = set(), {}
    for key, (module, part) in parts.items():
        if part in ("lora_A", "lora_embedding_A"):
            rank, count = parameter_rank(config, parameters.get(module), shapes[key][0])
            ranks.add(rank)
            if count > 1:  # r·E rows: expert weights, LoRA of rank r per expert
                experts[parameters[module]] = count
    ranks = sorted(ranks)
    module_types = sorted({_type_name(parameters[m]) if m in parameters else m.rsplit(".", 1)[-1] for m in modules})
    dora = config.use_dora or any(part == "lora_magnitude_vector" for _, part in parts.values())
    variant = "DoRA" if dora else "LoRA"
    if config.use_rslora:
        variant = "rs" + variant
    max_rank = max(ranks) if ranks else 0
    return {
        "name": name,
        "folder": str(folder),
        "variant": variant,
        "ranks": ranks,
        "lora_alpha": config.lora_alpha,
        "alpha_pattern": config.alpha_pattern,
        "rank_pattern": config.rank_pattern,
        "targets": module_types,
        "adapted_modules": len(modules),
        "target_parameters": config.target_parameters or [],
        "expert_targets": sorted({_type_name(p) for p in experts}),
        "expert_tensors": len(experts),
        "experts": max(experts.values(), default=0),
        "modules_to_save": config.modules_to_save or [],
        "bias": config.bias,
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "parameters": sum(_numel(s) for s in shapes.values()),
        "file_bytes": path.stat().st_size,
        "base_model": config.base_model_name_or_path,
        "base_architecture": _architecture(config.base_model_name_or_path),
        "vllm_default_max_lora_rank_ok": max_rank <= VLLM_DEFAULT_MAX_LORA_RANK,
        "vllm_note": _vllm_note(max_rank, dora, config),
    }


def _architecture(base: str | None) -> str | None:
    """The base model's architecture when it is a local folder with a config (nothing is downloaded)."""
    path = Path(base) / "config.json" if base else None
    if path is None or not path.is_file():
        return None
    try:
        architectures = json.loads(path.read_text()).get("architectures") or [None]
    except (OSError, ValueError):
        return None
    return architectures[0]


def _type_name(name: str) -> str:
    """``self_attn.q_proj`` for a module, ``mlp.experts.gate_up_proj`` for a parameter: the name after the
    layer index (or the last part when there is none)."""
    import re

    match = re.match(r"^.*?\.\d+\.(.+)$", name)
    return match.group(1) if match else name.rsplit(".", 1)[-1]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _vllm_note(max_rank: int, dora: bool, config) -> str:
    notes = []
    if max_rank <= VLLM_DEFAULT_MAX_LORA_RANK:
        notes.append(f"rank {max_rank} <= {VLLM_DEFAULT_MAX_LORA_RANK}: accepted with vLLM's default --max-lora-rank")
    else:
        needed = next(r for r in (32, 64, 128, 256, 320, 512) if r >= max_rank) if max_rank <= 512 else max_rank
        notes.append(f"rank {max_rank} > {VLLM_DEFAULT_MAX_LORA_RANK}: start vLLM with --max-lora-rank {needed}")
    if dora:
        notes.append("DoRA: merge it (lorakit merge) before serving with vLLM")
    if config.modules_to_save:
        notes.append("modules_to_save are fully trained modules that LoRA servers may ignore; merging is safer")
    return "; ".join(notes)


def _format(report: dict[str, Any]) -> str:
    rows = [
        ("adapter", f"{report['name']}  ({report['folder']})"),
        ("variant", report["variant"]),
        ("rank", ", ".join(map(str, report["ranks"])) or "-"),
        ("alpha", f"{report['lora_alpha']:g}" + (f"  pattern {report['alpha_pattern']}" if report["alpha_pattern"] else "")),
        ("targets", f"{', '.join(report['targets'])}  ({report['adapted_modules']} modules)"),
        *([("expert LoRA", f"{', '.join(report['expert_targets'])}: {report['experts']} experts, rank per expert "
                           f"{', '.join(map(str, report['ranks']))} ({report['expert_tensors']} tensors, PEFT's "
                           "target_parameters layout)")] if report.get("expert_targets") else []),
        ("modules_to_save", ", ".join(report["modules_to_save"]) or "-"),
        ("parameters", f"{report['parameters']:,d}"),
        ("file size", _human_bytes(report["file_bytes"])),
        ("base model", report["base_model"] or "(not recorded)"),
        ("vLLM", report["vllm_note"]),
    ]
    if "serving" in report:
        check = report["serving"]
        verdict = "ok" if check["ok"] else "NOT servable as is: " + "; ".join(check["problems"])
        rows.append((f"--for {check['server']}", "; ".join([verdict, *check["notes"]])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
