"""`lorakit inspect DIR --for vllm|lorax`: what a serving engine needs before it is handed an adapter."""

from __future__ import annotations

import json

import pytest
from conftest import make_tiny

from lorakit import LoraConfig, add_adapter, save_adapter
from lorakit.cli import main


def adapter(tmp_path, **options) -> str:
    model = make_tiny("llama")
    add_adapter(model, LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], **options}))
    save_adapter(model, tmp_path, base_model_name_or_path="tiny-llama")
    return str(tmp_path)


@pytest.mark.parametrize("server", ["vllm", "lorax"])
def test_a_plain_small_rank_adapter_is_servable(tmp_path, capsys, server):
    assert main(["inspect", adapter(tmp_path), "--for", server, "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["serving"]
    assert check == {"server": server, "ok": True, "problems": [], "notes": []}


def test_vllm_needs_a_rank_flag_above_16_and_refuses_dora_and_modules_to_save(tmp_path, capsys):
    folder = adapter(tmp_path / "a", r=48)
    assert main(["inspect", folder, "--for", "vllm"]) == 0
    assert "--max-lora-rank 64" in capsys.readouterr().out
    folder = adapter(tmp_path / "b", use_dora=True, modules_to_save=["lm_head"])
    assert main(["inspect", folder, "--for", "vllm", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["serving"]["problems"]
    assert len(problems) == 2 and "DoRA" in problems[0] and "modules_to_save (lm_head)" in problems[1]
    assert main(["inspect", folder, "--for", "vllm"]) == 1
    assert "NOT servable as is" in capsys.readouterr().out


def test_lorax_ignores_modules_it_does_not_know(tmp_path, capsys):
    folder = adapter(tmp_path, target_modules=["q_proj", "embed_tokens"])
    assert main(["inspect", folder, "--for", "lorax", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["serving"]
    assert check["ok"] and "embed_tokens" in check["notes"][0]
    folder = adapter(tmp_path / "only", target_modules=["embed_tokens"])
    assert main(["inspect", folder, "--for", "lorax", "--json"]) == 1


def _expert_adapter(tmp_path, arch: str, base_folder: bool = True, **options) -> str:
    from moe_models import make_moe

    model = make_moe(arch)
    base = tmp_path / f"base-{arch}"
    if base_folder:
        model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
        model.config.save_pretrained(base)
    add_adapter(model, LoraConfig(**{"r": 4, "target_modules": "all-linear", **options}))
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(base) if base_folder else "some/hub-id")
    return str(tmp_path / "adapter")


def test_inspect_shows_expert_targets_and_the_rank_per_expert(tmp_path, capsys):
    folder = _expert_adapter(tmp_path, "qwen3_moe")
    assert main(["inspect", folder, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_targets"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert report["experts"] == 4 and report["expert_tensors"] == 4  # 2 layers × 2 weights
    assert report["ranks"] == [4, 8]  # gate_up fuses gate and up: 2r, as PEFT's all-linear gives it
    assert "mlp.gate.weight" in report["targets"] and "q_proj" in report["targets"]
    assert main(["inspect", folder]) == 0
    assert "expert LoRA" in capsys.readouterr().out


def test_vllm_expert_layout_depends_on_the_base_architecture(tmp_path, capsys):
    # Qwen3-MoE: vLLM wants one 2-D adapter per expert -> not servable as is.
    folder = _expert_adapter(tmp_path / "q", "qwen3_moe")
    assert main(["inspect", folder, "--for", "vllm", "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["serving"]["problems"]
    assert len(problems) == 1 and "per-expert 2-D LoRA" in problems[0] and "Qwen3MoeForCausalLM" in problems[0]
    # gpt-oss: vLLM keeps its experts fused and reads PEFT's layout.
    folder = _expert_adapter(tmp_path / "g", "gpt_oss", target_modules=["q_proj"],
                             target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    assert main(["inspect", folder, "--for", "vllm", "--json"]) == 0
    check = json.loads(capsys.readouterr().out)["serving"]
    assert check["ok"] and "reads this layout for GptOssForCausalLM" in check["notes"][0]
    # Unknown base: both cases said, nothing claimed.
    folder = _expert_adapter(tmp_path / "u", "mixtral", base_folder=False)
    assert main(["inspect", folder, "--for", "vllm", "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["serving"]["notes"]
    assert "not known here" in notes[-1] and "GptOssForCausalLM" in notes[-1]
