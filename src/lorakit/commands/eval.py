"""``lorakit eval --base M --adapter DIR [--adapter DIR …] --data FILE [--tasks NAME[,NAME]] [--out DIR]``.

Measures the base model and each adapter on the same file: answer loss and perplexity (the
tokens training learns), greedy generations scored by exact/normalised match, contains, JSON
validity (and a schema) or your own function, and the forgetting check on general English.
With ``--tasks`` (the optional extra ``lorakit[lm-eval]``) it also runs lm-evaluation-harness
tasks on the base and each adapter, in process (:mod:`lorakit.evaluate.harness`); ``--data`` is
then optional. Prints the tables and writes ``report.md``, ``report.json``, ``examples.jsonl``,
``report.html`` (self-contained, opens offline) and ``report.png``.
"""

from __future__ import annotations

import argparse

from lorakit.commands.flags import non_negative_int, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, metavar="M", help="base model: hub id, folder, .gguf file or alias")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                        help="adapter folder to compare with the base; repeat for several")
    parser.add_argument("--data", metavar="FILE", help="evaluation data (any lorakit data format); optional with --tasks")
    parser.add_argument("--tasks", metavar="NAME[,NAME]",
                        help="lm-evaluation-harness tasks to run on the base and each adapter "
                             "(needs: pip install 'lorakit[lm-eval]')")
    parser.add_argument("--include-path", metavar="DIR", help="a folder of your own lm-eval task YAMLs (with --tasks)")
    parser.add_argument("--num-fewshot", type=non_negative_int, metavar="N", help="few-shot examples per lm-eval task "
                        "(default: the task's own)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="only the first N examples (per lm-eval task too)")
    parser.add_argument("--out", default="eval-report", metavar="DIR",
                        help="folder for report.md/json/html, examples.jsonl and report.png (default: eval-report)")
    parser.add_argument("--format", default="auto", help="data format (default: auto-detect)")
    parser.add_argument("--max-length", type=positive_int, default=1024, help="truncate rows to this many tokens (default 1024)")
    parser.add_argument("--chat-template", default="auto", metavar="T", help="'auto', 'plain', or a Jinja template")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="rows per batch (default 8)")
    parser.add_argument("--max-new-tokens", type=positive_int, metavar="N",
                        help="generation budget (default: longest reference + 50%% + 16, at most 512)")
    parser.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    parser.add_argument("--metrics", metavar="LIST",
                        help="comma-separated built-in metrics: exact_match, normalized_match, contains, json_valid "
                             "(default: the first three, plus json_valid when the answers are JSON)")
    parser.add_argument("--metric", action="append", default=[], metavar="MODULE:FUNCTION",
                        help="your metric, called as FUNCTION(prediction, reference) -> number; FILE.py:FUNCTION "
                             "works too; repeatable")
    parser.add_argument("--json-schema", metavar="FILE", help="also score answers against this JSON schema")
    parser.add_argument("--general", metavar="FILE",
                        help="general text for the forgetting check (default: the bundled English sample)")
    parser.add_argument("--general-limit", type=positive_int, metavar="N", help="only the first N rows of the general text")
    parser.add_argument("--no-forgetting", action="store_true", help="skip the forgetting check")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="compute dtype (default: bf16 on GPU, else fp32)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lorakit.adapter_io import load_adapter
    from lorakit.errors import LorakitError
    from lorakit.evaluate.comparison import GENERAL_ENGLISH, compare
    from lorakit.evaluate.core import EvalConfig
    from lorakit.evaluate.metrics import load_schema, load_user_metric
    from lorakit.evaluate.report import table, task_table, write_reports
    from lorakit.models import load_model, load_tokenizer

    if args.data is None and not args.tasks:
        raise LorakitError("nothing to evaluate: give --data FILE, --tasks NAME[,NAME] (lm-eval), or both")
    if args.include_path and not args.tasks:
        raise LorakitError("--include-path names a folder of lm-eval task YAMLs; give the tasks to run with --tasks")
    if args.data is not None and not Path(args.data).is_file():
        raise LorakitError(f"--data {args.data}: no such file")
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    manager = None
    if tasks:  # before any model loads: lm-eval installed, every task known
        from lorakit.evaluate import harness

        manager = harness.task_manager(args.include_path)
        harness.check_tasks(manager, tasks)
    sources = _adapter_names(args.adapter)
    for spec in args.metric:  # fail before loading any model
        load_user_metric(spec)
    config = EvalConfig(batch_size=args.batch_size, max_length=args.max_length, format=args.format,
                        chat_template=args.chat_template, limit=args.limit, generate=not args.no_generate,
                        max_new_tokens=args.max_new_tokens,
                        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
                        user_metrics=list(args.metric),
                        json_schema=load_schema(args.json_schema) if args.json_schema else None)
    general = None if args.no_forgetting else (args.general or GENERAL_ENGLISH)
    if general is not None and not Path(general).is_file():
        raise LorakitError(f"--general {general}: no such file")
    tokenizer = load_tokenizer(args.base)
    model = load_model(args.base, dtype=args.dtype, device=args.device)
    for name, folder in sources.items():
        load_adapter(model, folder, name=name, activate=False)
    if args.data is not None:
        report = compare(model, tokenizer, list(sources), args.data, config, general=general,
                         general_limit=args.general_limit, sources=sources, show_progress=not args.quiet)
    else:
        report = {"data": None, "models": [{"name": n, "adapter": sources.get(n)} for n in ["base", *sources]],
                  "examples": []}
    if tasks:
        report["lm_eval"] = harness.run_tasks(model, tokenizer, list(sources), tasks, include_path=args.include_path,
                                              limit=args.limit, num_fewshot=args.num_fewshot,
                                              batch_size=args.batch_size, manager=manager)
    written = write_reports(report, args.out)
    if args.data is not None:
        print(table(report))
    if tasks:
        print(("\n" if args.data is not None else "") + task_table(report))
    print(f"\nreports: {', '.join(str(p) for p in written)}")
    return 0


def _adapter_names(specs: list[str]) -> dict[str, str]:
    """``[NAME=]DIR`` -> {name: folder}; names default to the folder's name, made unique."""
    from pathlib import Path

    from lorakit.adapters.peft_format import CONFIG_NAME
    from lorakit.errors import LorakitError
    from lorakit.inject import check_adapter_name

    found: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep:
            folder = spec
            base = "".join(c if c.isalnum() or c in "_-" else "_" for c in Path(spec.rstrip("/")).name)[:60] or "adapter"
            name, n = base, 2
            while name in found or name == "base":
                name, n = f"{base}-{n}", n + 1
        check_adapter_name(name)
        if name in found or name == "base":
            raise LorakitError(f"adapter name {name!r} is used twice (or is 'base'); give NAME=DIR")
        if not (Path(folder) / CONFIG_NAME).is_file():
            raise LorakitError(f"--adapter {folder}: no {CONFIG_NAME}; not an adapter folder")
        found[name] = folder
    return found
