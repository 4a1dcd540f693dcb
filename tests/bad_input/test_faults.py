"""Injected faults, with the operating system's own failure: ``lorakit`` runs in a child process
whose file-size limit (``RLIMIT_FSIZE``) is below what it must write, so the write fails with
EFBIG (SIGXFSZ ignored, as a shell's ``ulimit -f`` user would see it). After each: the previous
result is intact and loadable, the message names what failed, and a later run without the limit
completes (training resumes from its last checkpoint)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import torch
from bad_input.bad_helpers import FAULTS, TRACEBACK
from safetensors.torch import load_file

LIMIT = 3000  # bytes: above every small JSON/YAML file a run writes, below every tensor file


def lorakit(*argv, limit: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    if limit is not None:
        FAULTS["injected"] += 1
    env = {**os.environ, "LORAKIT_CACHE": str(cwd / "cache")} if cwd else dict(os.environ)
    return subprocess.run([sys.executable, "-m", "lorakit.cli", *map(str, argv)], capture_output=True, text=True,
                          preexec_fn=child if limit is not None else None, env=env, timeout=600)


def assert_failed_cleanly(result: subprocess.CompletedProcess, *culprits: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert TRACEBACK not in result.stderr, result.stderr[-2000:]
    assert "file too large" in result.stderr.lower() or "file-size limit" in result.stderr.lower(), result.stderr
    for culprit in culprits:
        assert culprit in result.stderr, (culprit, result.stderr[-2000:])


def assert_adapter_loads(folder: Path, model: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    import lorakit

    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    lorakit.load_adapter(base, folder)
    return load_file(str(folder / "adapter_model.safetensors"))


def test_checkpoint_and_final_adapter_save_fail_whole_and_training_resumes(world, tmp_path):
    run = tmp_path / "run"
    common = [world.config, f"output={run}", "train.save_every=2"]
    first = lorakit("train", *common, "train.max_steps=2", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = assert_adapter_loads(run / "adapter", world.model)
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-000002"]

    # The step-4 checkpoint's tensor files are over the limit: the save fails at its first large file.
    failed = lorakit("train", *common, "train.max_steps=4", "--quiet", "--resume", "auto", limit=LIMIT, cwd=tmp_path)
    assert_failed_cleanly(failed, str(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # no half checkpoint
    after = assert_adapter_loads(run / "adapter", world.model)  # the previous final adapter, whole
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert_adapter_loads(run / "checkpoints" / "step-000002", world.model)

    resumed = lorakit("train", *common, "train.max_steps=4", "--quiet", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "step-000002" in resumed.stderr or "resum" in (resumed.stderr + resumed.stdout).lower()
    state = json.loads((run / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    assert_adapter_loads(run / "adapter", world.model)


def test_merge_fails_whole_and_the_previous_merged_model_stays(world, tmp_path):
    out = tmp_path / "merged"
    good = lorakit("merge", "--base", world.model, "--adapter", world.adapter, "--out", out, cwd=tmp_path)
    assert good.returncode == 0, good.stderr[-2000:]
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    failed = lorakit("merge", "--base", world.model, "--adapter", world.adapter, "--out", out, "--force",
                     limit=LIMIT, cwd=tmp_path)
    assert_failed_cleanly(failed, str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temporary left behind
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # still a whole, loadable model
    again = lorakit("merge", "--base", world.model, "--adapter", world.adapter, "--out", out, "--force", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]


def test_combine_fails_whole_and_the_previous_output_stays(world, tmp_path):
    out = tmp_path / "combined"
    args = ["combine", world.adapter, world.adapter, "--method", "linear", "--out", out, "--force"]
    assert lorakit(*args, cwd=tmp_path).returncode == 0
    before = (out / "adapter_model.safetensors").read_bytes()
    failed = lorakit(*args, "--weights", "0.5", "0.25", limit=LIMIT, cwd=tmp_path)
    assert_failed_cleanly(failed, str(out))
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert_adapter_loads(out, world.model)


# `lorakit train` in a child process whose file-size limit drops to LIMIT the moment the run starts
# writing its final adapter (the audit event of creating the adapter's temporary folder): the disk
# "fills" after the last checkpoint was written, where a real run's does.
TRAIN_UNTIL_FINAL_ADAPTER = f"""
import os, resource, signal, sys
from pathlib import Path

def fill_the_disk(event, args):
    if event == "os.mkdir" and Path(os.fsdecode(args[0])).name == ".adapter.tmp":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

sys.addaudithook(fill_the_disk)
from lorakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_run_whose_final_adapter_save_fails_keeps_the_old_adapter_and_a_resume_writes_it(world, tmp_path):
    run = tmp_path / "run"
    common = [world.config, f"output={run}", "train.save_every=2"]
    first = lorakit("train", *common, "train.max_steps=2", "--quiet", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    FAULTS["injected"] += 1
    env = {**os.environ, "LORAKIT_CACHE": str(tmp_path / "cache")}
    failed = subprocess.run([sys.executable, "-c", TRAIN_UNTIL_FINAL_ADAPTER, "train", *map(str, common),
                             "train.max_steps=4", "--quiet", "--resume", "auto"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert_failed_cleanly(failed, str(run / "adapter"), "step-000004", "--resume")
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before  # the old adapter, whole
    assert_adapter_loads(run / "adapter", world.model)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # nothing half-written left
    trained = assert_adapter_loads(run / "checkpoints" / "step-000004", world.model)  # nothing trained is lost

    resumed = lorakit("train", *common, "train.max_steps=4", "--quiet", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    written = assert_adapter_loads(run / "adapter", world.model)
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in trained)
    steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4  # the resume wrote the adapter, it did not train on


SAVE_ADAPTER = """
import sys, torch, lorakit
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
lorakit.add_adapter(model, lorakit.LoraConfig(r=int(sys.argv[3]), target_modules=["q_proj", "v_proj"],
                                              init_lora_weights="gaussian"))
try:
    lorakit.save_adapter(model, sys.argv[2])
except lorakit.LorakitError as err:
    print(f"error: {err}", file=sys.stderr)
    sys.exit(2)
"""


def test_the_final_adapter_save_fails_whole_and_the_previous_adapter_stays(world, tmp_path):
    """``save_adapter``, which writes a run's final adapter (and any user's), over an adapter already there."""
    out = tmp_path / "adapter"
    first = subprocess.run([sys.executable, "-c", SAVE_ADAPTER, world.model, out, "2"], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    before = (out / "adapter_model.safetensors").read_bytes()

    def child():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 512, len(before) + 512))

    FAULTS["injected"] += 1
    failed = subprocess.run([sys.executable, "-c", SAVE_ADAPTER, world.model, out, "16"], capture_output=True,
                            text=True, preexec_fn=child)
    assert_failed_cleanly(failed, str(out / "adapter_model.safetensors"))
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert_adapter_loads(out, world.model)


def test_token_cache_write_fails_without_a_partial_entry_and_is_written_later(world, tmp_path):
    rows = [json.dumps({"text": f"line {i} " * 20}) for i in range(60)]
    data = tmp_path / "many.jsonl"
    data.write_text("\n".join(rows) + "\n")
    failed = lorakit("data", "check", data, "--model", world.model, limit=LIMIT, cwd=tmp_path)
    cache = tmp_path / "cache" / "data"
    # The cache is an optimisation: a failed write is said and the check itself still answers.
    assert TRACEBACK not in failed.stderr, failed.stderr[-2000:]
    assert failed.returncode == 0, failed.stderr[-2000:]
    assert "token cache" in failed.stderr and "file too large" in failed.stderr.lower(), failed.stderr
    assert "60 kept" in failed.stdout or "60" in failed.stdout
    assert not cache.exists() or not any(cache.iterdir())  # no partial entry is left to be trusted
    later = lorakit("data", "check", data, "--model", world.model, cwd=tmp_path)
    assert later.returncode == 0 and len(list(cache.glob("*.safetensors"))) == 1
