"""A user's own config, as a user runs it: `lorakit train CONFIG` against transformers Trainer + PEFT.

    python benchmarks/user_config.py [--rows 1000] [--long-rows N] [--sets varied,uniform,long] [--repeats 2]
                                     [--fp32-too] [--threads N] [--json FILE]

At the default (1,000 rows per set, two runs per side) this takes many hours on a 2-core CPU (the long
set alone is ~1 M tokens per run); ``--rows N``, ``--long-rows N`` and ``--sets`` make a quicker run.
``--fp32-too`` adds a third side, the same user config with ``train.dtype=fp32``, interleaved with the
other two: how much of lorakit's lead is its bf16 default on a CPU with native bf16 (the Trainer's CPU
default is fp32, and that is what a Trainer user runs). The header prints the commit measured.

For each data set, a training file of ``--rows`` generated chat rows (``chat_data.py``: multi-turn
WordNet definitions in ``messages`` format) and an eval file of ``--eval-rows`` more:

    varied   40–250 tokens per row,   max_length 256
    uniform  120–136 tokens per row,  max_length 256
    long     900–1,000 tokens per row, max_length 1024

lorakit side: ``lorakit train config.yaml`` (the CLI, in its own process) with a config that holds
**only** the model, the data files, the format, max_length and these hyper-parameters — everything
else is lorakit's default::

    LoRA r 16, alpha 32, dropout 0.05 on q/k/v/o/gate/up/down; batch_size 8; lr 2e-4; cosine;
    10 warm-up steps; one epoch

Trainer side: a plain transformers script in its own process: ``AutoModelForCausalLM`` and
``AutoTokenizer`` from the same safetensors folder lorakit loads (the converted built-in
SmolLM2-135M-Instruct, as a hub cache would hold it), the same rows tokenised by
``lorakit.data.tokenize_file`` (same tokens, same answer-only labels), ``peft.get_peft_model`` with
the same LoRA, ``DataCollatorForSeq2Seq`` padding, ``TrainingArguments`` with the same values and
its defaults for the rest, ``trainer.train()``, ``trainer.evaluate()`` on the eval file,
``trainer.save_model()``. Both sides run with their own defaults for everything else, torch's default
threads: lorakit picks its batching, micro-batches and dtype for the machine (and prints them; bf16 on
a CPU with AVX512-BF16 or AMX), the Trainer runs fp32 (its CPU default; ``--trainer-bf16`` gives it
``bf16=True`` for comparison). On the long rows the Trainer accumulates one row at a time
(``TRAINER_ROWS_PER_PASS``): eight rows of ~1,000 tokens at once need ~28 GB there.

The sides alternate (A B, then B A, …, ``--repeats`` runs each). Reported per side (medians):

- non-pad tokens/s over the training time (lorakit: ``train_s`` of its last ``metrics.jsonl`` row;
  Trainer: the wall time of ``trainer.train()``), and over the whole command (the process's wall
  time from start to exit: Python start-up, imports, model load, tokenisation, training, the
  evaluation, saving);
- peak RSS of the process (``ru_maxrss`` from ``wait4``);
- eval loss after one epoch: both saved adapters measured afterwards by the same function
  (``lorakit.evaluate.core.answer_loss``, mean over the eval file's answer tokens), in this process.

Ratios are lorakit ÷ Trainer of the same round, median over rounds. Targets (issue #16), over the
whole command: tokens/s ≥ 2.0× on varied, ≥ 1.5× on uniform and long; peak RSS ≤ 0.7×; eval loss
≤ 1.01×. The model is converted from its GGUF file once before the first run (both sides load the
converted folder); each lorakit run gets a fresh copy of the data files, so its tokenisation cache
never hits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HYPER = dict(r=16, alpha=32, dropout=0.05, batch_size=8, lr=2e-4, schedule="cosine", warmup_steps=10, epochs=1)
TARGET_RATIOS = {"varied": 2.0, "uniform": 1.5, "long": 1.5}


def user_config(train: Path, held: Path, max_length: int) -> dict:
    """The config a user writes: model, data files, format, max_length and the hyper-parameters. Nothing else."""
    return {"model": MODEL,
            "data": {"train": str(train), "eval": str(held), "format": "messages", "max_length": max_length},
            "adapter": {"r": HYPER["r"], "alpha": HYPER["alpha"], "dropout": HYPER["dropout"], "targets": TARGETS},
            "train": {"batch_size": HYPER["batch_size"], "lr": HYPER["lr"], "schedule": HYPER["schedule"],
                      "warmup_steps": HYPER["warmup_steps"], "epochs": HYPER["epochs"]}}


# -- the Trainer side (a child process) ----------------------------------------------------------------


def trainer_child(train: Path, held: Path, max_length: int, out: Path, per_device: int, bf16: bool) -> dict:
    """What a transformers user's script does; returns its training time and the adapter folder.

    ``per_device`` rows per forward pass, accumulated to ``batch_size`` rows per step (8 by default: the
    issue's setting); ``bf16``: ``TrainingArguments(bf16=True)`` (CPU autocast), the flag a Trainer user
    has to know."""
    import peft
    import torch
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments)

    from lorakit.data import DataConfig, tokenize_file
    from lorakit.models import resolve

    folder = resolve(MODEL)  # the safetensors folder (converted once, before the first run)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    def rows(path: Path) -> list[dict]:
        config = DataConfig(train=str(path), format="messages", max_length=max_length)
        dataset, _ = tokenize_file(str(path), tokenizer, config, use_cache=False)
        out = []
        for i in range(len(dataset)):
            ids, labels = dataset.row(i)
            out.append({"input_ids": ids.tolist(), "attention_mask": [1] * len(ids), "labels": labels.tolist()})
        return out

    train_rows, eval_rows = rows(train), rows(held)
    model = peft.get_peft_model(model, peft.LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"],
                                                       lora_dropout=HYPER["dropout"], target_modules=TARGETS,
                                                       task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(out / "trainer-run"), per_device_train_batch_size=per_device,
                             gradient_accumulation_steps=HYPER["batch_size"] // per_device,
                             per_device_eval_batch_size=per_device, num_train_epochs=HYPER["epochs"],
                             learning_rate=HYPER["lr"], lr_scheduler_type=HYPER["schedule"],
                             warmup_steps=HYPER["warmup_steps"], use_cpu=True, report_to="none", bf16=bf16)
    trainer = Trainer(model=model, args=args, train_dataset=train_rows, eval_dataset=eval_rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True))
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    metrics = trainer.evaluate()
    trainer.save_model(str(out / "adapter"))
    return {"train_s": train_s, "trainer_eval_loss": metrics["eval_loss"], "adapter": str(out / "adapter")}


# -- running both sides -----------------------------------------------------------------------------------


def run_child(command: list[str], cwd: Path, log: Path, max_rss: int) -> tuple[float, int, float]:
    """Run ``command``; its wall time, peak RSS in bytes (``ru_maxrss`` of this child, from wait4) and CPU time.

    A child whose RSS passes ``max_rss`` is stopped (the machine would run out of memory): an error.
    """
    with open(log, "w") as out:
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        over, done = threading.Event(), threading.Event()
        threading.Thread(target=_watch_rss, args=(child.pid, max_rss, over, done), daemon=True).start()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage: its peak RSS and CPU time
        done.set()
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if over.is_set():
        raise MemoryError(f"{' '.join(command)} passed {max_rss / 2**30:.1f} GiB of RSS and was stopped")
    if child.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({child.returncode}); its output:\n{log.read_text()[-4000:]}")
    return wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def _watch_rss(pid: int, limit: int, over: threading.Event, done: threading.Event) -> None:
    while not done.wait(0.5):
        try:
            rss = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) * 1024
        except (OSError, IndexError, ValueError):  # gone, or a zombie (no VmRSS) about to be reaped
            continue
        if rss > limit:
            over.set()
            os.kill(pid, signal.SIGKILL)
            return


def run_lorakit(config: Path, work: Path, data: Path, overrides: list[str], max_rss: int) -> dict:
    """``lorakit train config.yaml [overrides]`` in a fresh folder, with fresh copies of the data files."""
    import yaml

    work.mkdir(parents=True)
    values = yaml.safe_load(config.read_text())
    for key in ("train", "eval"):  # a new path: the tokenisation cache cannot hit
        copy = work / Path(values["data"][key]).name
        shutil.copy2(data / Path(values["data"][key]).name, copy)
        values["data"][key] = str(copy)
    (work / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    lorakit = Path(sys.executable).with_name("lorakit")
    command = [str(lorakit)] if lorakit.is_file() else [sys.executable, "-m", "lorakit.cli"]
    wall, rss, cpu = run_child([*command, "train", "config.yaml", *overrides], work, work / "output.log", max_rss)
    from lorakit.train.progress import read_metrics

    rows = read_metrics(work / "runs" / "lorakit" / "metrics.jsonl")
    last = [r for r in rows if "train_s" in r][-1]
    evals = [r for r in rows if "eval_loss" in r]
    return {"wall_s": wall, "peak_rss": rss, "cpu_s": cpu, "train_s": last["train_s"], "tokens": last["tokens"],
            "eval_s": sum(r.get("eval_s", 0.0) for r in evals), "own_eval_loss": evals[-1]["eval_loss"],
            "adapter": str(work / "runs" / "lorakit" / "adapter")}


def run_trainer(work: Path, data: Path, max_length: int, per_device: int, bf16: bool, max_rss: int) -> dict:
    work.mkdir(parents=True)
    command = [sys.executable, __file__, "--trainer-child", str(data / "train.jsonl"), str(data / "eval.jsonl"),
               str(max_length), str(work), str(per_device), "bf16" if bf16 else "fp32"]
    wall, rss, cpu = run_child(command, work, work / "output.log", max_rss)
    result = json.loads((work / "result.json").read_text())
    return {"wall_s": wall, "peak_rss": rss, "cpu_s": cpu, **result}


def eval_losses(results: list[dict], held: Path, max_length: int) -> None:
    """Each run's adapter on the eval file, by one function (lorakit's answer loss), one base model."""
    import torch

    from lorakit.adapter_io import load_adapter
    from lorakit.data import DataConfig, pad_token_id, tokenize_file
    from lorakit.evaluate.core import answer_loss
    from lorakit.inject import delete_adapter
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    rows, _ = tokenize_file(str(held), tokenizer, DataConfig(train=str(held), format="messages",
                                                             max_length=max_length), use_cache=False)
    model = load_model(MODEL, dtype=torch.float32, device="cpu")
    for result in results:
        load_adapter(model, result["adapter"])
        result["eval_loss"] = answer_loss(model, rows, pad_token_id(tokenizer), HYPER["batch_size"])["loss"]
        delete_adapter(model, "default")


SIDES = ("lorakit", "trainer", "lorakit-fp32")
"""The user's config as written, the Trainer, and (``--fp32-too``) the user's config with ``train.dtype=fp32``:
whether lorakit's lead is more than its bf16 default on this CPU."""

TRAINER_ROWS_PER_PASS = {"long": 1}
"""Rows per Trainer forward pass where 8 do not fit: 8 rows of ~1,000 tokens need ~28 GB in the Trainer
(fp32 logits over the vocabulary, PEFT's activations: ~3.5 MB per token measured), more than these
24 GiB machines have; a Trainer user then accumulates, as here: 1 row × 8 accumulation steps, the same
8-row batch per optimizer step, and no padding (its fastest setting that fits)."""


def measure_set(name: str, bounds: tuple[int, int, int], args: argparse.Namespace, root: Path) -> dict:
    import chat_data
    import wordnet_data
    import yaml

    from lorakit.data import DataConfig, tokenize_file
    from lorakit.models import load_tokenizer

    low, high, max_length = bounds
    data = root / name / "data"
    tokenizer = load_tokenizer(MODEL)
    rows = args.long_rows if name == "long" and args.long_rows else args.rows
    eval_rows = args.eval_rows or max(20, rows // 10)
    chats = chat_data.build_chats(rows + eval_rows, low, high, seed=args.seed, tokenizer=tokenizer)
    train = wordnet_data.write_jsonl(chats[:rows], data / "train.jsonl")
    held = wordnet_data.write_jsonl(chats[rows:], data / "eval.jsonl")
    config = data / "config.yaml"
    config.write_text(yaml.safe_dump(user_config(train, held, max_length), sort_keys=False))
    dataset, _ = tokenize_file(str(train), tokenizer, DataConfig(train=str(train), format="messages",
                                                                 max_length=max_length), use_cache=False)
    tokens = int(dataset.lengths.sum())
    per_device = TRAINER_ROWS_PER_PASS.get(name, HYPER["batch_size"])
    note = (f"; Trainer: {per_device} row(s) per pass × {HYPER['batch_size'] // per_device} accumulation"
            if per_device != HYPER["batch_size"] else "")
    print(f"\n== {name}: {rows} rows of {low}–{high} tokens (mean {dataset.lengths.mean():.0f}), "
          f"{tokens:,} tokens; {eval_rows} eval rows; max_length {max_length}{note}", flush=True)
    sides = SIDES if args.fp32_too else SIDES[:2]
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    stopped = None
    for round_ in range(args.repeats):
        for side in sides if round_ % 2 == 0 else sides[::-1]:
            work = root / name / f"{side}-{round_}"
            try:
                if side == "trainer":
                    result = run_trainer(work, data, max_length, per_device, args.trainer_bf16, args.max_rss)
                else:
                    extra = ["train.dtype=fp32"] if side == "lorakit-fp32" else []
                    result = run_lorakit(config, work, data, args.lorakit_args.split() + extra, args.max_rss)
            except MemoryError as err:
                stopped = f"{side}: {err}"
                print(f"  round {round_ + 1} {side:<8} stopped: {err}", flush=True)
                break
            runs[side].append(result)
            print(f"  round {round_ + 1} {side:<12} {tokens / result['train_s']:7.1f} tokens/s training, "
                  f"{tokens / result['wall_s']:7.1f} whole command ({result['wall_s']:.0f} s, "
                  f"{result['cpu_s']:.0f} CPU s), peak RSS {result['peak_rss'] / 2**20:,.0f} MiB", flush=True)
        if stopped:
            break
    if stopped:
        return {"rows": rows, "tokens": tokens, "max_length": max_length, "runs": runs, "stopped": stopped}
    eval_losses([r for side in sides for r in runs[side]], held, max_length)
    return {"rows": rows, "tokens": tokens, "max_length": max_length, "trainer_rows_per_pass": per_device,
            "runs": runs, "summary": summarise(runs, tokens)}


def summarise(runs: dict[str, list[dict]], tokens: int) -> dict:
    def per_side(rs: list[dict]) -> dict:
        return {"train_tokens_per_s": statistics.median(tokens / r["train_s"] for r in rs),
                "whole_tokens_per_s": statistics.median(tokens / r["wall_s"] for r in rs),
                "peak_rss": statistics.median(r["peak_rss"] for r in rs),
                "cpu_s": statistics.median(r["cpu_s"] for r in rs),
                "eval_loss": statistics.median(r["eval_loss"] for r in rs)}

    def ratio(side: str) -> dict:
        pairs = list(zip(runs[side], runs["trainer"]))  # the same round
        return {"train_tokens_per_s": statistics.median(t["train_s"] / lk["train_s"] for lk, t in pairs),
                "whole_tokens_per_s": statistics.median(t["wall_s"] / lk["wall_s"] for lk, t in pairs),
                "peak_rss": statistics.median(lk["peak_rss"] / t["peak_rss"] for lk, t in pairs),
                "cpu_s": statistics.median(t["cpu_s"] / lk["cpu_s"] for lk, t in pairs),
                "eval_loss": statistics.median(lk["eval_loss"] / t["eval_loss"] for lk, t in pairs)}

    summary = {side: per_side(rs) for side, rs in runs.items()}
    summary["ratio"] = ratio("lorakit")
    if "lorakit-fp32" in runs:
        summary["ratio-fp32"] = ratio("lorakit-fp32")
    return summary


def print_table(results: dict, args: argparse.Namespace) -> None:
    print(f"\nlorakit train CONFIG vs transformers Trainer + PEFT, SmolLM2-135M-Instruct on the CPU "
          f"({os.cpu_count()} CPUs, {args.threads or 'default'} thread(s)), {args.repeats} run(s) per side, "
          f"alternating; lorakit overrides: "
          f"{args.lorakit_args or 'none'}; Trainer {'bf16=True' if args.trainer_bf16 else 'fp32 (its default)'}")
    print(f"source: {args.source}")
    print(f"{'set':<8} {'side':<12} {'tok/s train':>11} {'tok/s whole':>11} {'peak RSS MiB':>12} {'eval loss':>9} "
          f"{'CPU s':>7}")
    for name, result in results.items():
        if "stopped" in result:
            print(f"{name:<8} not measured: {result['stopped']}")
            continue
        summary = result["summary"]
        for side in [s for s in SIDES if s in summary]:
            row = summary[side]
            print(f"{name:<8} {side:<12} {row['train_tokens_per_s']:>11.1f} {row['whole_tokens_per_s']:>11.1f} "
                  f"{row['peak_rss'] / 2**20:>12,.0f} {row['eval_loss']:>9.4f} {row['cpu_s']:>7.0f}")
        for key, label in (("ratio", "ratio"), ("ratio-fp32", "ratio fp32")):
            if key not in summary:
                continue
            r = summary[key]
            print(f"{name:<8} {label:<12} {r['train_tokens_per_s']:>10.2f}× {r['whole_tokens_per_s']:>10.2f}× "
                  f"{r['peak_rss']:>11.2f}× {r['eval_loss']:>8.3f}× {r['cpu_s']:>6.2f}×"
                  + (f"   targets: whole ≥ {TARGET_RATIOS[name]}×, RSS ≤ 0.7×, eval loss ≤ 1.01×" if key == "ratio"
                     else "   (lorakit with train.dtype=fp32 ÷ Trainer)"))
    print("ratios: lorakit ÷ Trainer of the same round, median over rounds (tokens/s, and Trainer CPU s ÷ "
          "lorakit CPU s: higher is faster; peak RSS and eval loss: lower is better)")
    print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


def source_snapshot() -> str:
    """The commit measured, and whether the work tree differed from it (a digest of ``git diff HEAD``)."""
    import hashlib

    def git(*command: str) -> str:
        result = subprocess.run(["git", *command], cwd=HERE, capture_output=True, text=True)
        return result.stdout if result.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown (not a git checkout)"
    diff = git("diff", "HEAD")
    return head + (f" + uncommitted changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})" if diff else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="training rows per data set (default 1000)")
    parser.add_argument("--long-rows", type=int, default=None, help="training rows of the long set (default --rows)")
    parser.add_argument("--eval-rows", type=int, default=None, help="eval rows per data set (default rows / 10, ≥ 20)")
    parser.add_argument("--fp32-too", action="store_true",
                        help="also run the user's config with train.dtype=fp32 (a third side, interleaved): how much "
                             "of lorakit's lead is its bf16 default on this CPU")
    parser.add_argument("--sets", default="varied,uniform,long", help="data sets to run (default all three)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per side, alternating (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="data generation seed")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--keep", type=Path, help="keep the run folders here (default: a temporary folder)")
    parser.add_argument("--lorakit-args", default="", help="experiments: key=value overrides after the config "
                        "(e.g. 'train.dtype=fp32'); the reported figures use none")
    parser.add_argument("--trainer-bf16", action="store_true",
                        help="experiments: the Trainer with TrainingArguments(bf16=True)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both sides (default: unset, torch's default; on a busy shared "
                             "machine 1 gives far steadier ratios: two threads spin-wait for each other)")
    parser.add_argument("--max-rss-gib", type=float, default=None,
                        help="stop a run whose RSS passes this (default: 90%% of the memory available at the start)")
    parser.add_argument("--trainer-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_child:
        train, held, max_length, out, per_device, precision = args.trainer_child
        result = trainer_child(Path(train), Path(held), int(max_length), Path(out), int(per_device),
                               precision == "bf16")
        (Path(out) / "result.json").write_text(json.dumps(result))
        return 0
    import chat_data

    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both sides' processes
    args.source = source_snapshot()
    available = int(Path("/proc/meminfo").read_text().split("MemAvailable:")[1].split()[0]) * 1024
    args.max_rss = int(args.max_rss_gib * 2**30) if args.max_rss_gib else int(0.9 * available)
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in sets if s not in chat_data.SETS]
    if unknown:
        parser.error(f"--sets: unknown {unknown}; choose from {', '.join(chat_data.SETS)}")
    from lorakit.models import resolve

    resolve(MODEL)  # convert the GGUF once, before any timed run
    root = Path(tempfile.mkdtemp(prefix="user-config-")) if args.keep is None else args.keep
    results = {}
    try:
        for name in sets:
            results[name] = measure_set(name, chat_data.SETS[name], args, root)
            if len(sets) > 1:
                print_table({name: results[name]}, args)  # each set's figures as soon as they exist
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results, args)
    if args.json:
        environment = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                       "load_average": os.getloadavg(), "source": args.source}
        args.json.write_text(json.dumps({"environment": environment, "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
