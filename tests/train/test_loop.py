"""The training run on a tiny Llama with SmolLM2's tokenizer: learning, PEFT output, exact resume,
Ctrl-C, NaN, early stopping, keep best."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft_oracle import logits, peft_load
from safetensors.torch import load_file
from train.train_helpers import read_jsonl, tiny_config, tiny_model_dir

from lorakit.adapter_io import load_adapter
from lorakit.errors import LorakitError
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig
from lorakit.train.loop import train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def config(tmp: Path, model_dir: str, **train_settings) -> RunConfig:
    return RunConfig.from_dict(tiny_config(tmp, model_dir, **train_settings))


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def losses(run_folder: Path) -> list[tuple[int, float]]:
    return [(r["step"], r.get("loss", r.get("eval_loss"))) for r in read_jsonl(run_folder / "metrics.jsonl")]


def test_loss_goes_down_and_peft_loads_the_adapter(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    result = train(config(tmp_path, model_dir, lr=5e-2, max_steps=12, eval_every=4, save_every=None), quiet=True)
    assert result.stopped == "completed" and result.step == 12
    evals = [r["eval_loss"] for r in read_jsonl(result.output / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and evals[-1] < evals[0] - 0.05, evals
    assert (result.output / "config.yaml").is_file()
    assert RunConfig.from_dict(__import__("yaml").safe_load((result.output / "config.yaml").read_text())).train.lr == 5e-2

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    base_logits = logits(base, ids)
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_adapter(ours, result.adapter)
    our_logits = logits(ours, ids)
    assert (our_logits - base_logits).abs().max() > 1e-3  # the adapter does something
    theirs = peft_load(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), result.adapter)
    torch.testing.assert_close(logits(theirs, ids), our_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dora", "qlora"])
def test_dora_and_qlora_runs_learn_and_load_in_peft(tmp_path, model_dir, method):
    from transformers import AutoModelForCausalLM

    settings = tiny_config(tmp_path, model_dir, lr=5e-2, max_steps=8, eval_every=4, save_every=None)
    settings["adapter"]["method"] = method
    result = train(RunConfig.from_dict(settings), quiet=True)
    evals = [r["eval_loss"] for r in read_jsonl(result.output / "metrics.jsonl") if "eval_loss" in r]
    assert evals[-1] < evals[0] - 0.05, evals
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(0))
    ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if method == "qlora":
        from lorakit.adapters.quant import quantize_model

        quantize_model(ours)
    load_adapter(ours, result.adapter)
    config = __import__("json").loads((Path(result.adapter) / "adapter_config.json").read_text())
    assert config["use_dora"] is (method == "dora")
    if method == "dora":  # the DoRA file gives PEFT the same model
        theirs = peft_load(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), result.adapter)
        # Logits reach ~9 after these lr 5e-2 steps: 5e-5 is fp32 rounding of two implementations.
        torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-5, atol=5e-5)


def test_resume_mid_epoch_is_bit_identical(tmp_path, model_dir):
    settings = dict(max_steps=7, grad_accum=2, eval_every=3, save_every=100)  # dropout 0.1 on: RNG matters
    straight = train(config(tmp_path / "a", model_dir, **settings), quiet=True)

    def stop_at_4(event, run):
        if event == "step_start" and run.state.step == 4:
            raise KeyboardInterrupt

    cut = config(tmp_path / "b", model_dir, **settings)
    first = train(cut, callbacks=[stop_at_4], quiet=True)
    assert first.stopped == "interrupted" and first.step == 4
    assert first.checkpoint.name == "step-000004"
    cut.resume = "auto"
    second = train(cut, quiet=True)
    assert second.stopped == "completed" and second.step == 7
    assert losses(second.output) == losses(straight.output)
    a, b = adapter_tensors(straight.adapter), adapter_tensors(second.adapter)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ctrl_c_flag_saves_and_stops(tmp_path, model_dir):
    def ctrl_c_at_3(event, run):
        if event == "step_end" and run.state.step == 3:
            run.stop_requested = True  # what the SIGINT handler does

    result = train(config(tmp_path, model_dir, max_steps=10, save_every=None), callbacks=[ctrl_c_at_3], quiet=True)
    assert result.stopped == "interrupted" and result.step == 3
    state, rng = ckpt.load_checkpoint(result.checkpoint)
    assert state.step == 3 and "torch" in rng


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, model_dir):
    def poison_at_5(event, run):
        if event == "step_start" and run.state.step == 4:  # step 5 is about to run
            head = run.model.get_output_embeddings()
            head.register_forward_hook(lambda module, args, out: out * float("nan"))

    cfg = config(tmp_path, model_dir, max_steps=10, save_every=2)
    with pytest.raises(LorakitError, match=r"step 5: the loss is nan.*step-000004"):
        train(cfg, callbacks=[poison_at_5], quiet=True)
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in found] == ["step-000002", "step-000004"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_adapter(model, found[-1])
    assert all(torch.isfinite(t).all() for t in adapter_tensors(found[-1]).values())
    # and the run continues from it
    cfg.resume = "auto"
    assert train(cfg, quiet=True).step == 10


def test_early_stopping_keeps_the_best_adapter(tmp_path, model_dir):
    def spoil_after_4(event, run):  # from step 5 on, every step damages the adapter: eval loss rises
        if event == "step_end" and run.state.step > 4:
            with torch.no_grad():
                for name, param in run.model.named_parameters():
                    if "lora_B" in name:
                        param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(run.state.step)))

    cfg = config(tmp_path, model_dir, lr=5e-2, max_steps=30, eval_every=2, early_stopping_patience=2,
                 save_every=None, keep_checkpoints=1)
    result = train(cfg, callbacks=[spoil_after_4], quiet=True)
    assert result.stopped == "early_stopping" and result.step == result.best_step + 4  # patience 2 x eval_every 2
    rows = [r for r in read_jsonl(result.output / "metrics.jsonl") if "eval_loss" in r]
    best = min(rows, key=lambda r: r["eval_loss"])
    assert result.best_step == best["step"] and result.best_step < result.step
    best_folder = result.output / "checkpoints" / f"step-{result.best_step:06d}"
    assert best_folder.is_dir()  # kept although keep_checkpoints is 1
    saved, final = adapter_tensors(best_folder), adapter_tensors(result.adapter)
    assert all(torch.equal(saved[k], final[k]) for k in saved)


def test_a_new_run_refuses_a_folder_with_checkpoints(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, max_steps=2, save_every=1)
    train(cfg, quiet=True)
    with pytest.raises(LorakitError, match="resume=auto"):
        train(cfg, quiet=True)
    cfg.resume = "auto"
    assert train(cfg, quiet=True).step == 2  # nothing left: the adapter is written again


def test_resume_refuses_a_different_adapter(tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, max_steps=2, save_every=1)
    train(cfg, quiet=True)
    cfg.resume, cfg.adapter.r = "auto", 8
    with pytest.raises(LorakitError, match="trained with adapter"):
        train(cfg, quiet=True)


def test_gradient_checkpointing_gives_the_same_steps(tmp_path, model_dir):
    # share_prefix off in both: with checkpointing it is off, and with dropout it draws other masks.
    plain = train(config(tmp_path / "a", model_dir, max_steps=2, save_every=None, share_prefix=False), quiet=True)
    recomputed = train(config(tmp_path / "b", model_dir, max_steps=2, save_every=None, share_prefix=False,
                              gradient_checkpointing=True), quiet=True)
    assert [r["loss"] for r in read_jsonl(plain.output / "metrics.jsonl") if "loss" in r] == pytest.approx(
        [r["loss"] for r in read_jsonl(recomputed.output / "metrics.jsonl") if "loss" in r], rel=1e-5)
    a, b = adapter_tensors(plain.adapter), adapter_tensors(recomputed.adapter)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_missing_tracker_is_an_error_at_start(tmp_path, model_dir):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    with pytest.raises(LorakitError, match=r"report_to: tensorboard is not installed \(pip install tensorboard\)"):
        train(config(tmp_path, model_dir, max_steps=2, report_to=["tensorboard"]), quiet=True)
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_plots_are_written_when_matplotlib_is_installed(tmp_path, model_dir):
    pytest.importorskip("matplotlib")
    result = train(config(tmp_path, model_dir, max_steps=3, eval_every=1, plots=True), quiet=True)
    for name in ("loss.png", "lr.png"):
        data = (result.output / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_training_tokens_per_s_excludes_evaluation_time(tmp_path, model_dir):
    # The same run twice, once with an evaluation callback that sleeps 1.5 s at each of its 3
    # evaluations: the training rate stays the same; counted in, the sleep would cut it by >10x.
    import time

    def slow_eval(event, run):
        if event == "eval":
            time.sleep(1.5)

    settings = dict(max_steps=6, eval_every=2, save_every=None)
    fast = train(config(tmp_path / "fast", model_dir, **settings), quiet=True)
    slow = train(config(tmp_path / "slow", model_dir, **settings), callbacks=[slow_eval], quiet=True)
    rate = {}
    for name, result in (("fast", fast), ("slow", slow)):
        rows = read_jsonl(result.output / "metrics.jsonl")
        last = [r for r in rows if "loss" in r][-1]
        evals = [r for r in rows if "eval_loss" in r]
        assert len(evals) == 3
        # train_s is logged to the millisecond: on a fast machine (6 steps in ~0.2 s) that rounding alone is 0.25 %
        assert last["tokens_per_s"] == pytest.approx(last["tokens"] / last["train_s"],
                                                     rel=1e-3 + 0.0005 / last["train_s"])
        rate[name] = last["tokens_per_s"]
        if name == "slow":
            assert all(r["eval_s"] >= 1.5 for r in evals)  # the evaluation's own time, reported apart
            assert last["elapsed_s"] - last["train_s"] >= 3.0  # two evaluations before step 6's row
    assert 1 / 3 < rate["slow"] / rate["fast"] < 3


def test_the_run_prints_its_batching_choice(tmp_path, model_dir, capsys):
    train(config(tmp_path / "auto", model_dir, max_steps=1, save_every=None))
    out = capsys.readouterr().out
    assert ("batching: padded, length-grouped (data.packing: auto; sdpa attention on cpu would compute every pair "
            "of a packed row's tokens; rows of similar length padded cost less)") in out.splitlines()
    packed = tiny_config(tmp_path / "packed", model_dir, max_steps=1, save_every=None)
    packed["data"]["packing"] = True
    train(RunConfig.from_dict(packed))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batching:")]
    assert lines == ["batching: packed, 2 rows of up to 96 tokens per batch, each example with its own positions and "
                     "a block-causal mask (data.packing: true; sdpa attention computes every pair of a packed row's "
                     "tokens on cpu)"]
