"""``lorakit data check FILE --model M``: see what training will see, before training.

Prints the detected format, row counts, token-length statistics and histogram, the share of
answer tokens, truncated and skipped rows with their locations, and the first example with
trained tokens marked. Uses the same code path (and cache) as training.
"""

from __future__ import annotations

import argparse
import sys

from lorakit.commands.flags import positive_int
from lorakit.data.config import FORMATS, LONG_ROW_POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    check = sub.add_parser("check", help="format, counts, token lengths, truncation and the first example",
                           description="Read FILE as training would and report what the model will see.")
    check.add_argument("file", metavar="FILE", help="data file: .jsonl, .json, .csv or .parquet")
    check.add_argument("--model", "-m", required=True, metavar="M",
                       help="base model whose tokenizer and chat template to use (id, folder, .gguf, alias)")
    check.add_argument("--format", default="auto", choices=FORMATS, help="data format (default: auto-detect)")
    check.add_argument("--max-length", type=positive_int, default=512, help="longest row in tokens (default 512)")
    check.add_argument("--on-long-row", default="truncate", choices=LONG_ROW_POLICIES,
                       help="rows over --max-length (default: truncate, counted)")
    check.add_argument("--skip-bad-rows", action="store_true",
                       help="count and list malformed rows instead of stopping at the first")
    check.add_argument("--train-on-inputs", action="store_true", help="train on prompts too")
    check.add_argument("--last-turn-only", action="store_true", help="train on the final assistant turn only")
    check.add_argument("--chat-template", default="auto", metavar="T",
                       help="'auto' (the model's own), 'plain', or a Jinja template")
    check.add_argument("--no-cache", action="store_true", help="tokenise afresh and leave the cache alone")
    check.add_argument("--tokens", action="store_true", help="also print the first example token by token")
    check.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                       help="mark trained tokens in colour (default: on a terminal)")


def run(args: argparse.Namespace) -> int:
    import logging

    from lorakit.data.check import check_report
    from lorakit.data.config import DataConfig
    from lorakit.data.tokenize import tokenize_file
    from lorakit.models import load_tokenizer

    config = DataConfig(train=args.file, format=args.format, max_length=args.max_length,
                        on_long_row=args.on_long_row, on_bad_row="skip" if args.skip_bad_rows else "error",
                        train_on_inputs=args.train_on_inputs, last_turn_only=args.last_turn_only,
                        chat_template=args.chat_template, cache=not args.no_cache)
    logging.getLogger("lorakit.data").setLevel(logging.ERROR)  # the report below lists every problem
    tokenizer = load_tokenizer(args.model)
    dataset, report = tokenize_file(args.file, tokenizer, config)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(check_report(dataset, report, tokenizer, color=color, tokens=args.tokens))
    return 0
