"""Faults from outside the process: Ctrl-C (SIGINT) to a running `lorakit train`, kill -9 while a
checkpoint is being written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from train.train_helpers import read_jsonl, tiny_config, tiny_model_dir

from lorakit.adapter_io import load_adapter
from lorakit.train import checkpoints as ckpt

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return env


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_sigint_saves_a_loadable_checkpoint_and_exits_130(tmp_path, model_dir):
    from transformers import AutoModelForCausalLM

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, model_dir, max_steps=500, save_every=None)))
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli", "train", str(path)], cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(read_jsonl(metrics)) >= 2, 90, proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted at step" in out and "Traceback" not in out
    found = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert len(found) == 1
    state, _ = ckpt.load_checkpoint(found[0])
    assert state.step == len(read_jsonl(metrics)) >= 2 and state.step < 500
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_adapter(model, found[0])


KILLER = textwrap.dedent("""
    import sys, torch
    from transformers import AutoModelForCausalLM
    from lorakit.adapters.config import LoraConfig
    from lorakit.inject import add_adapter
    from lorakit.train import checkpoints as ckpt
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    add_adapter(model, LoraConfig(r=64, lora_alpha=64, target_modules="all-linear"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sum(p.sum() for p in params).backward()
    opt.step()
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in params:
                p.fill_(step)  # every tensor of checkpoint N holds N: a mixed checkpoint is detectable
        ckpt.save_checkpoint(sys.argv[2], model, opt, ckpt.TrainerState(step=step))
        ckpt.prune(sys.argv[2], keep=1000, best_step=None) if step % 50 == 0 else None
""")


@pytest.mark.parametrize("delay", [0.05, 0.37])
def test_kill_9_never_leaves_a_half_written_checkpoint(tmp_path, model_dir, delay):
    from safetensors.torch import load_file

    folder = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", KILLER, model_dir, str(folder)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: len(ckpt.list_checkpoints(folder)) >= 3, 90, proc)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    found = ckpt.list_checkpoints(folder)
    assert len(found) >= 3
    for path in found:
        step = int(path.name.split("-")[1])
        state, _ = ckpt.load_checkpoint(path)
        assert state.step == step
        tensors = load_file(str(path / "adapter_model.safetensors"))
        assert all(torch.all(t == step) for t in tensors.values()), path
    # a resumed run clears the leftovers of the interrupted write
    ckpt.prune(folder, keep=1000, best_step=None)
    assert not list(folder.glob(".tmp-*"))
