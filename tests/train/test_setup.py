"""The run's choices for the hardware: dtype (bf16 on CPUs that multiply it natively) and its line."""

from __future__ import annotations

import pytest
import torch
from train.train_helpers import read_jsonl, tiny_config, tiny_model_dir

from lorakit.train.config import RunConfig
from lorakit.train.loop import train
from lorakit.train.setup import cpu_bf16, resolve_dtype


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def _cpu(monkeypatch, avx512_bf16: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, torch.float32)])
def test_auto_dtype_on_the_cpu_is_bf16_where_it_is_native(monkeypatch, avx512_bf16, amx, expected):
    _cpu(monkeypatch, avx512_bf16, amx)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32  # asked for: kept
    assert resolve_dtype("auto", torch.device("cpu"), base_trained=True) == torch.float32  # AdamW on base tensors
    assert cpu_bf16() == ("AMX" if amx else "AVX512-BF16" if avx512_bf16 else None)


def test_a_bf16_cpu_run_learns_and_says_so(tmp_path, model_dir, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM

    from lorakit.adapter_io import load_adapter

    _cpu(monkeypatch, avx512_bf16=True)  # on a CPU without it bf16 is emulated: slower, the same numbers
    values = tiny_config(tmp_path, model_dir, dtype="auto", lr=5e-2, max_steps=8, eval_every=4, save_every=None)
    result = train(RunConfig.from_dict(values))
    out = capsys.readouterr().out
    assert ("train.dtype: auto: bf16 on this CPU (AVX512-BF16: native bf16 matmuls); the adapter and AdamW state "
            "stay fp32 (train.dtype=fp32 for full precision)") in out
    assert "steps on cpu (torch.bfloat16)" in out
    evals = [r["eval_loss"] for r in read_jsonl(result.output / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_adapter(model, result.adapter)  # fp32 adapter weights, usable in full precision
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)


def test_a_resumed_auto_run_keeps_the_batching_it_started_with(tmp_path, model_dir, capsys):
    # A checkpoint of packed batches resumed where `auto` would pad (another machine, here: the
    # setting changed to auto): the batch plan, and so the data position, stays the packed one.
    def stop_at_3(event, run):
        if event == "step_start" and run.state.step == 3:
            raise KeyboardInterrupt

    values = tiny_config(tmp_path, model_dir, max_steps=6, save_every=None)
    values["data"]["packing"] = True
    assert train(RunConfig.from_dict(values), callbacks=[stop_at_3], quiet=True).stopped == "interrupted"
    values["data"]["packing"] = "auto"
    values["resume"] = "auto"
    result = train(RunConfig.from_dict(values))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batching:")]
    assert result.stopped == "completed" and result.step == 6
    assert lines == ["batching: packed, 2 rows of up to 96 tokens per batch, each example with its own positions and "
                     "a block-causal mask (data.packing: auto, packed as when this run started: the checkpoint's "
                     "batch plan)"]


def test_micro_batches_give_the_batch_gradient(tmp_path, model_dir):
    # Batches of 2 rows (~60–90 tokens each) run whole, or as micro-batches of one row (a limit of 64
    # tensor tokens): the same loss and gradient norm, step after step.
    rows = {}
    for name, limit in (("whole", None), ("micro", 64)):
        values = tiny_config(tmp_path / name, model_dir, max_steps=3, save_every=None, micro_batch_tokens=limit,
                             share_prefix=False)
        values["adapter"]["dropout"] = 0.0  # the same numbers however the rows are grouped
        result = train(RunConfig.from_dict(values), quiet=True)
        rows[name] = [(r["loss"], r["grad_norm"]) for r in read_jsonl(result.output / "metrics.jsonl") if "loss" in r]
    assert len(rows["whole"]) == 3
    for (loss, norm), (micro_loss, micro_norm) in zip(rows["whole"], rows["micro"]):
        assert micro_loss == pytest.approx(loss, rel=1e-5) and micro_norm == pytest.approx(norm, rel=1e-4)
