"""`lorakit train` on a tiny Qwen3-MoE: all-linear trains the experts and the router (with the router's
load-balancing loss), resumes bit-identically, and PEFT loads the adapter; a target list that leaves
the experts out is said at start."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft_oracle import logits, peft_load
from safetensors.torch import load_file
from train.train_helpers import read_jsonl, tiny_config

from lorakit.adapter_io import load_adapter
from lorakit.train.config import RunConfig
from lorakit.train.loop import train
from lorakit.train.setup import build_run


@functools.cache
def _moe_dir(root: str) -> str:
    import transformers as tf

    from lorakit.models import load_tokenizer

    folder = Path(root) / "tiny-qwen3-moe"
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    config = tf.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                               moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                               initializer_range=0.3, tie_word_embeddings=True, output_router_logits=True,
                               router_aux_loss_coef=0.05, bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory) -> str:
    return _moe_dir(str(tmp_path_factory.mktemp("tiny-moe")))


def _config(tmp: Path, model_dir: str, **train_settings) -> RunConfig:
    settings = tiny_config(tmp, model_dir, **train_settings)
    settings["adapter"] = {"r": 4, "alpha": 8, "targets": "all-linear"}  # dropout left at its default
    return RunConfig.from_dict(settings)


def _expert_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(Path(folder) / "adapter_model.safetensors")).items()
            if ".mlp.experts." in k or ".mlp.gate." in k}


def test_all_linear_trains_the_experts_resumes_exactly_and_loads_in_peft(tmp_path, moe_dir, capsys):
    from transformers import AutoModelForCausalLM

    settings = dict(max_steps=6, grad_accum=2, eval_every=3, save_every=100, lr=2e-2)
    straight = train(_config(tmp_path / "a", moe_dir, **settings), quiet=False)
    said = capsys.readouterr().out
    assert "adapter.dropout: 0.05 -> 0" in said and "leave the experts out" not in said
    trained = _expert_tensors(straight.adapter)
    # Experts (both weights) and router: A (r·E, in) / B (out, r·E), B moved away from its zero init.
    assert {k.split(".mlp.")[1] for k in trained} == {
        "experts.base_layer.lora_A.weight", "experts.base_layer.lora_B.weight", "experts.lora_A.weight",
        "experts.lora_B.weight", "gate.lora_A.weight", "gate.lora_B.weight"}
    assert trained["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"].shape == (8 * 4, 32)
    assert all(t.abs().sum() > 0 for k, t in trained.items() if "lora_B" in k)
    yaml_config = (straight.output / "config.yaml").read_text()
    assert "dropout: 0.0" in yaml_config

    def stop_at_4(event, run):
        if event == "step_start" and run.state.step == 4:
            raise KeyboardInterrupt

    cut = _config(tmp_path / "b", moe_dir, **settings)
    first = train(cut, callbacks=[stop_at_4], quiet=True)
    assert first.stopped == "interrupted" and first.step == 4
    cut.resume = "auto"
    second = train(cut, quiet=True)
    assert second.step == 6
    steps = lambda run: [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_jsonl(run / "metrics.jsonl")]  # noqa: E731
    assert steps(second.output) == steps(straight.output)
    a, b = (load_file(str(Path(r.adapter) / "adapter_model.safetensors")) for r in (straight, second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32).eval()
    load_adapter(ours, straight.adapter)
    theirs = peft_load(AutoModelForCausalLM.from_pretrained(moe_dir, dtype=torch.float32), straight.adapter)
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=1e-5)


def test_a_target_list_without_the_experts_is_said_at_start(tmp_path, moe_dir, capsys):
    config = _config(tmp_path, moe_dir, max_steps=1)
    config.adapter.targets = ["q_proj", "v_proj"]
    run, _ = build_run(config)
    said = capsys.readouterr().out
    experts = sum(p.numel() for n, p in run.model.named_parameters() if ".mlp.experts." in n and "lora_" not in n)
    assert said.count("leave the experts out") == 1
    assert f"{experts:,} of the model's" in said and "mlp.experts.down_proj, mlp.experts.gate_up_proj" in said
    assert "adapter.dropout" not in said  # no target parameters: the dropout stays


def test_spectrum_targets_on_moe_skip_experts_and_routers(tmp_path, moe_dir, capsys, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    config = _config(tmp_path, moe_dir, max_steps=1)
    config.adapter.targets = "spectrum:50"
    run, _ = build_run(config)
    said = capsys.readouterr().out
    assert "selected matrices are not linear layers" in said and "a router" in said
    adapted = [n for n, m in run.model.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(".self_attn." in n for n in adapted)  # experts unranked, routers skipped
