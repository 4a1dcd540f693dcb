"""Multi-process training on CPU with gloo: 2 real processes (torchrun or plain subprocesses) on a tiny Llama.

- DDP, 2 processes × micro-batch b == 1 process × micro-batch 2b (losses and adapter, 1e-5, fp32);
- FSDP2, 2 processes == 1 process (1e-4), through partial steps at epoch ends and evaluation;
- a 2-process checkpoint resumes in 1 process with the same global batch and the same data order;
- a process that dies (or stalls) makes the other stop with a clear message; the checkpoint loads.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from train.train_helpers import read_jsonl, tiny_config, tiny_model_dir, write_data

from lorakit.errors import LorakitError
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig
from lorakit.train.distributed import accumulation
from lorakit.train.loop import train
from lorakit.train.run import plan_steps

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def settings(tmp: Path, model_dir: str, name: str, packing: bool = True, **train_settings) -> dict:
    values = tiny_config(tmp, model_dir, **train_settings)
    values["adapter"]["dropout"] = 0.0  # same numbers whatever process a row lands on
    # One process with 2 rows per micro-batch would run their shared system prompt once, two processes
    # with one row each could not: the same math, but rounded otherwise (compared over 10 Adam steps).
    values["train"]["share_prefix"] = False
    values["data"]["packing"] = packing
    values["output"] = str(tmp / name)
    return values


def env() -> dict[str, str]:
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp: Path, values: dict, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def torchrun(config: Path, *args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "lorakit.cli", "train", str(config), *args]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]


def eval_losses(run: Path) -> list[float]:
    return [r["eval_loss"] for r in read_jsonl(run / "metrics.jsonl") if "eval_loss" in r]


def assert_same_adapter(a: Path, b: Path, rtol: float) -> None:
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys() and ta
    for key in ta:
        torch.testing.assert_close(ta[key], tb[key], rtol=rtol, atol=rtol * float(tb[key].abs().max()), msg=key)


# -- pure parts ------------------------------------------------------------------------------------


def test_the_global_batch_fixes_the_rows_of_every_step_however_it_is_split():
    from lorakit.data.config import DataConfig

    lengths = [(7 * i) % 50 + 5 for i in range(37)]
    data = DataConfig(train="x.jsonl", packing=False, max_length=64)
    one = plan_steps(lengths, data, batch_size=4, per_step=1, epoch=1)  # 1 process, micro-batch 4
    split = plan_steps(lengths, data, batch_size=2, per_step=2, epoch=1)  # micro-batch 2 × (2 processes)
    assert [sorted(sum(s, [])) for s in one] == [sorted(sum(s, [])) for s in split]
    assert sorted(sum((sum(s, []) for s in split), [])) == list(range(37))  # every row once: no overlap, no loss
    assert all(len(mb) <= 2 for s in split for mb in s)


def test_accumulation_keeps_the_global_batch():
    assert accumulation(2, 1, 8, world=2) == (2, None)
    assert accumulation(2, 3, None, world=2) == (3, None)
    accum, note = accumulation(2, 1, None, world=1, keep=4)  # a 2-process checkpoint, now 1 process
    assert accum == 2 and "grad_accum 1 -> 2" in note
    with pytest.raises(LorakitError, match="multiple of 4"):
        accumulation(2, 1, 6, world=2)
    with pytest.raises(LorakitError, match="disagree"):
        accumulation(2, 3, 8, world=2)


def test_config_checks_the_distributed_options(tmp_path, model_dir):
    values = settings(tmp_path, model_dir, "x")
    values["train"]["distributed"] = "fsdp2"
    with pytest.raises(LorakitError, match="train.distributed"):
        RunConfig.from_dict(values)
    values["train"].update(distributed="fsdp", global_batch=0)
    with pytest.raises(LorakitError, match="train.global_batch"):
        RunConfig.from_dict(values)


# -- real processes --------------------------------------------------------------------------------


def test_ddp_two_processes_match_one_process_with_twice_the_micro_batch(tmp_path, model_dir):
    one = train(RunConfig.from_dict(settings(tmp_path, model_dir, "one", packing=False, batch_size=2,
                                              max_steps=10, save_every=None)), quiet=True)
    config = write_config(tmp_path, settings(tmp_path, model_dir, "ddp", packing=False, batch_size=1, max_steps=10,
                                             save_every=5), "ddp")
    command = [sys.executable, "-m", "lorakit.cli", "train", str(config), "--nproc", "2"]
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "ddp"
    assert done.stdout.count("global batch 2 = 1 rows × 1 accumulation × 2 processes (ddp)") == 1
    assert done.stdout.count("done (completed) after 10 steps") == 1  # process 0 alone reports
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 11)) + [10]  # written once
    torch.testing.assert_close(train_losses(run), train_losses(one.output), rtol=1e-5, atol=0)
    torch.testing.assert_close(eval_losses(run), eval_losses(one.output), rtol=1e-5, atol=0)
    assert_same_adapter(run / "adapter", one.adapter, rtol=1e-5)
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step-000005", "step-000010"]
    assert ckpt.load_checkpoint(run / "checkpoints" / "step-000010")[0].global_batch == 2


def test_fsdp_two_processes_match_one_process(tmp_path, model_dir):
    # 9 rows, global batch 4: the last step of each epoch has one micro-batch, so process 1 runs a
    # weight-0 filler there; evaluation runs through the sharded model.
    def values(name: str, **train_settings) -> dict:
        v = settings(tmp_path, model_dir, name, packing=False, epochs=2, max_steps=None, eval_every=3,
                     save_every=None, **train_settings)
        v["data"]["train"] = write_data(tmp_path, rows=9, name="nine.jsonl")
        return v

    one = train(RunConfig.from_dict(values("one", batch_size=2, grad_accum=2)), quiet=True)
    done = torchrun(write_config(tmp_path, values("fsdp", batch_size=2, global_batch=4, distributed="fsdp"), "fsdp"))
    assert "global batch 4 = 2 rows × 1 accumulation × 2 processes (fsdp)" in done.stdout
    run = tmp_path / "fsdp"
    assert len(train_losses(run)) == 6 and len(eval_losses(run)) == 2
    torch.testing.assert_close(train_losses(run), train_losses(one.output), rtol=1e-4, atol=0)
    torch.testing.assert_close(eval_losses(run), eval_losses(one.output), rtol=1e-4, atol=0)
    assert_same_adapter(run / "adapter", one.adapter, rtol=1e-4)


def test_a_two_process_checkpoint_resumes_in_one_process_with_the_same_data_order(tmp_path, model_dir, capsys):
    values = settings(tmp_path, model_dir, "two", batch_size=1, max_steps=6, save_every=2)  # packed
    torchrun(write_config(tmp_path, values, "two"), "-q")
    two = tmp_path / "two"
    resumed = dict(values, output=str(tmp_path / "resumed"), resume=str(two / "checkpoints" / "step-000002"))
    result = train(RunConfig.from_dict(resumed))
    out = capsys.readouterr().out
    assert "keeping the checkpoint's global batch of 2 rows on 1 process(es): train.grad_accum 1 -> 2" in out
    assert result.step == 6
    steps = [r["step"] for r in read_jsonl(result.output / "metrics.jsonl") if "loss" in r]
    assert steps == [3, 4, 5, 6]
    torch.testing.assert_close(train_losses(result.output), train_losses(two)[2:], rtol=1e-5, atol=0)
    assert_same_adapter(result.adapter, two / "adapter", rtol=1e-5)


DRIVER = """
import os, sys, time
from lorakit.errors import LorakitError
from lorakit.train.config import load_config
from lorakit.train.loop import train

def die(event, run):
    if event == "step_end" and run.state.step == 3 and os.environ["RANK"] == "1":
        if sys.argv[2] == "exit":
            os._exit(3)
        time.sleep(600)

try:
    train(load_config(sys.argv[1]), callbacks=[die], quiet=True)
except LorakitError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("how", ["exit", "stall"])
def test_a_lost_process_stops_the_others_with_a_message_and_the_checkpoint_loads(tmp_path, model_dir, how):
    from transformers import AutoModelForCausalLM

    from lorakit.adapter_io import load_adapter

    values = settings(tmp_path, model_dir, "run", batch_size=1, max_steps=8, save_every=2, dist_timeout=8)
    config = write_config(tmp_path, values, "run")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    port = str(free_port())
    procs = []
    for rank in (0, 1):  # plain processes, not torchrun: nobody else would stop the survivor
        rank_env = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                    "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(driver), str(config), how], env=rank_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    began = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - began
    finally:
        procs[1].kill()
        procs[1].communicate()
    assert procs[0].returncode == 2, err[-3000:]
    assert "process 0 of 2: lost contact with the other training processes during step 4" in err, err[-3000:]
    assert "run/checkpoints/step-000002" in err and "--resume auto" in err
    assert waited < 100
    last = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert last.name == "step-000002"
    state, _ = ckpt.load_checkpoint(last)
    assert state.step == 2 and state.world_size == 2
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    load_adapter(model, last)


def test_nproc_needs_a_config_and_no_launcher_around_it(tmp_path, model_dir, capsys, monkeypatch):
    from lorakit.cli import main

    assert main(["train", "--nproc", "2"]) == 2
    assert "--nproc needs a CONFIG" in capsys.readouterr().err
    config = write_config(tmp_path, settings(tmp_path, model_dir, "x"), "x")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", str(config), "--nproc", "2"]) == 2
    assert "drop --nproc" in capsys.readouterr().err
