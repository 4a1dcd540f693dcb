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
