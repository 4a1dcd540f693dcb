"""`lorakit train` against transformers' Trainer + PEFT: same data, model and hyper-parameters.

    python benchmarks/train_vs_trainer.py [--rows 240] [--eval-rows 40] [--threads 2] [--no-share-prefix]
                                          [--json FILE]

Data: WordNet definitions in `messages` format (``wordnet_data.py``), tokenised once by
``lorakit.data`` (SmolLM2's chat template, answer-only labels) and given to both sides, so both
learn from exactly the same tokens. Model: SmolLM2-135M-Instruct, fp32, CPU. Adapter: LoRA r=16,
alpha 32, dropout 0.05, all linear layers. One epoch, batch 8, AdamW lr 2e-4, 10 warm-up steps,
cosine decay, clipping at 1.0, seed 0.

- ``lorakit``: ``lorakit.train.train`` with its defaults for batching (length-grouped padded batches)
  and the loss (chunked, answer tokens only; the system prompt every row starts with runs once per
  batch: ``train.share_prefix``, off with ``--no-share-prefix``).
- ``trainer``: ``transformers.Trainer`` on a PEFT model, with the usual padded batches in random order.

Each side runs in its own process (peak RSS is per process), twice, in alternating order. Reported:
non-pad training tokens per second (the same token count divided by the training wall time: lorakit's
training loop from ``metrics.jsonl``, ``trainer.train()`` for the Trainer; lorakit's time including
model load and tokenisation is printed too), the
process's peak RSS, and the eval loss on the held-out rows after the same number of examples,
measured for both by the same function (``lorakit.evaluate.core.answer_loss``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HYPER = dict(r=16, alpha=32, dropout=0.05, batch_size=8, lr=2e-4, warmup_steps=10, max_length=128, seed=0)


def _data(folder: Path, rows: int, eval_rows: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(HERE))
    import wordnet_data

    all_rows = wordnet_data.build_rows(rows + eval_rows, seed=1)
    train = wordnet_data.write_jsonl(all_rows[:rows], folder / "train.jsonl")
    held = wordnet_data.write_jsonl(all_rows[rows:], folder / "eval.jsonl")
    return train, held


def _tokenized(path: Path, tokenizer):
    from lorakit.data import DataConfig, tokenize_file

    dataset, _ = tokenize_file(str(path), tokenizer, DataConfig(train=str(path), max_length=HYPER["max_length"]),
                               use_cache=False)
    return dataset


def _eval_loss(model, tokenizer, held: Path) -> float:
    from lorakit.data import pad_token_id
    from lorakit.evaluate.core import answer_loss

    model.eval()
    return answer_loss(model, _tokenized(held, tokenizer), pad_token_id(tokenizer), HYPER["batch_size"])["loss"]


def run_lorakit(train: Path, held: Path, out: Path, share_prefix: bool = True) -> dict:
    from lorakit.models import load_model, load_tokenizer
    from lorakit.train.config import RunConfig
    from lorakit.train.loop import train as run

    config = RunConfig.from_dict({
        "model": "smollm2-135m-instruct",
        "data": {"train": str(train), "max_length": HYPER["max_length"], "packing": False, "cache": False},
        "adapter": {"r": HYPER["r"], "alpha": HYPER["alpha"], "dropout": HYPER["dropout"], "targets": "all-linear"},
        "train": {"epochs": 1, "batch_size": HYPER["batch_size"], "lr": HYPER["lr"], "schedule": "cosine",
                  "warmup_steps": HYPER["warmup_steps"], "seed": HYPER["seed"], "eval_every": None,
                  "save_every": None, "plots": False, "device": "cpu", "dtype": "fp32", "share_prefix": share_prefix},
        "output": str(out / "lorakit-run"),
    })
    start = time.perf_counter()
    result = run(config, quiet=True)
    total = time.perf_counter() - start
    from lorakit.adapter_io import load_adapter
    from lorakit.train.progress import read_metrics

    # The training loop's own time (its steps; evaluation and checkpoints are timed apart); `total` adds
    # loading the model and tokenising the data.
    seconds = [row for row in read_metrics(result.output / "metrics.jsonl") if "train_s" in row][-1]["train_s"]

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = load_model("smollm2-135m-instruct", dtype="fp32", device="cpu")
    load_adapter(model, result.adapter)
    return {"seconds": seconds, "total_seconds": total, "eval_loss": _eval_loss(model, tokenizer, held)}


def run_trainer(train: Path, held: Path, out: Path) -> dict:
    import peft
    import torch
    from transformers import Trainer, TrainingArguments

    from lorakit.data import pad_token_id
    from lorakit.data.collation import collate_padded
    from lorakit.models import load_model, load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    dataset = _tokenized(train, tokenizer)
    rows = [dataset.row(i) for i in range(len(dataset))]
    pad = pad_token_id(tokenizer)
    torch.manual_seed(HYPER["seed"])
    model = load_model("smollm2-135m-instruct", dtype="fp32", device="cpu").train()
    model = peft.get_peft_model(model, peft.LoraConfig(r=HYPER["r"], lora_alpha=HYPER["alpha"],
                                                       lora_dropout=HYPER["dropout"], target_modules="all-linear"))

    def collator(batch):  # the usual padded batch (rows in the sampler's random order)
        return {k: v for k, v in collate_padded(batch, pad_token_id=pad).items() if k != "position_ids"}

    args = TrainingArguments(output_dir=str(out / "trainer-run"), per_device_train_batch_size=HYPER["batch_size"],
                             num_train_epochs=1, learning_rate=HYPER["lr"], lr_scheduler_type="cosine",
                             warmup_steps=HYPER["warmup_steps"], max_grad_norm=1.0, seed=HYPER["seed"],
                             save_strategy="no", report_to=[], logging_steps=1000, use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "eval_loss": _eval_loss(model, tokenizer, held)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--eval-rows", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-share-prefix", action="store_true", help="lorakit without train.share_prefix")
    parser.add_argument("--json")
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "TRAIN", "EVAL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        side, train, held, out = args.child
        if side == "lorakit":
            result = run_lorakit(Path(train), Path(held), Path(out), share_prefix=not args.no_share_prefix)
        else:
            result = run_trainer(Path(train), Path(held), Path(out))
        result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(json.dumps(result))
        return
    from lorakit.models import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        train, held = _data(folder, args.rows, args.eval_rows)
        dataset = _tokenized(train, load_tokenizer("smollm2-135m-instruct"))
        tokens = int(dataset.lengths.sum())
        runs: dict[str, list[dict]] = {"lorakit": [], "trainer": []}
        for order in (("lorakit", "trainer"), ("trainer", "lorakit")):
            for side in order:
                cmd = [sys.executable, __file__, "--threads", str(args.threads), "--child", side, str(train),
                       str(held), str(folder / f"{side}-{len(runs[side])}")]
                cmd += ["--no-share-prefix"] if args.no_share_prefix else []
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"{side} failed:\n{done.stderr[-3000:]}")
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {side: {"tokens_per_s": statistics.median(tokens / r["seconds"] for r in rs),
                      "peak_rss": statistics.median(r["peak_rss"] for r in rs),
                      "eval_loss": statistics.median(r["eval_loss"] for r in rs)} for side, rs in runs.items()}
    ratio = {
        "tokens_per_s": summary["lorakit"]["tokens_per_s"] / summary["trainer"]["tokens_per_s"],
        "peak_rss": summary["lorakit"]["peak_rss"] / summary["trainer"]["peak_rss"],
        "eval_loss": summary["lorakit"]["eval_loss"] / summary["trainer"]["eval_loss"],
    }
    print(f"{args.rows} train rows ({tokens:,} non-pad tokens), {args.eval_rows} eval rows, SmolLM2 LoRA r=16 "
          f"all-linear, 1 epoch, batch 8, {args.threads} thread(s), 2 runs per side, lorakit share_prefix "
          f"{'off' if args.no_share_prefix else 'on'}")
    print(f"{'side':<10}{'tokens/s':>10}{'peak RSS MiB':>14}{'eval loss':>11}")
    for side, row in summary.items():
        print(f"{side:<10}{row['tokens_per_s']:>10.1f}{row['peak_rss'] / 2**20:>14.0f}{row['eval_loss']:>11.4f}")
    whole = statistics.median(tokens / r["total_seconds"] for r in runs["lorakit"])
    print(f"lorakit including model load and tokenisation: {whole:.1f} tokens/s")
    print(f"lorakit ÷ Trainer+PEFT: tokens/s {ratio['tokens_per_s']:.2f}, peak RSS {ratio['peak_rss']:.2f}, "
          f"eval loss {ratio['eval_loss']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "summary": summary, "ratio": ratio,
                                               "load_average": os.getloadavg()}, indent=2))
    print("load average at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
