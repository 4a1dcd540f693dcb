"""Generated multi-turn chat rows of a chosen token length, from WordNet (``wordnet_data.py``).

Each row is a conversation in OpenAI ``messages`` format: the user asks for the definition of a
word, the assistant answers with its WordNet gloss, and so on for as many turns as fit the row's
target length. The target of each row is drawn uniformly from ``[min_tokens, max_tokens]``, and the
length is exact for SmolLM2-135M-Instruct's chat template (its default system prompt included,
as a conversation without a system message gets it): the template is additive at its special
tokens, so a row's length is the system part plus the sum of its turns' lengths.

Three sets, as ``benchmarks/user_config.py`` uses them::

    varied   40–250 tokens   (1 to ~10 turns)
    uniform  120–136 tokens  (one length class)
    long     900–1,000 tokens (~30 turns), trained with max_length 1024

Usage::

    python benchmarks/chat_data.py --rows 1000 --min 40 --max 250 --out chats.jsonl
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wordnet_data  # noqa: E402  (benchmarks/ is not a package)

SETS = {"varied": (40, 250, 256), "uniform": (120, 136, 256), "long": (900, 1000, 1024)}
"""name -> (min tokens, max tokens, max_length of the training config)."""


def _turn(synset: wordnet_data.Synset) -> list[dict]:
    return wordnet_data.to_row(synset)["messages"]


def build_chats(rows: int, min_tokens: int, max_tokens: int, seed: int = 0, tokenizer=None,
                cache: Path | None = None) -> list[dict]:
    """``rows`` conversations whose SmolLM2 chat-template length lies in ``[min_tokens, max_tokens]``.

    Args:
        rows: how many rows.
        min_tokens, max_tokens: the length range (tokens, template included).
        seed: draws the targets and the order of the synsets.
        tokenizer: the tokenizer that measures lengths (default SmolLM2-135M-Instruct's).
        cache: see :func:`wordnet_data.wordnet_dir`.

    Returns:
        The rows, each ``{"messages": [user, assistant, user, assistant, …]}``.
    """
    if tokenizer is None:
        from lorakit.models import load_tokenizer

        tokenizer = load_tokenizer("smollm2-135m-instruct")
    synsets = wordnet_data.read_synsets(wordnet_data.wordnet_dir(cache))
    rng = np.random.default_rng(seed)
    order = iter(rng.permutation(len(synsets)).tolist())
    probe = _turn(synsets[0])
    base = 2 * _length(tokenizer, probe) - _length(tokenizer, probe + probe)  # the system prompt's part
    out = []
    while len(out) < rows:
        target = int(rng.integers(min_tokens, max_tokens + 1))
        messages, length, misses = [], base, 0
        while misses < 50:
            turn = _turn(synsets[next(order)])
            extra = _length(tokenizer, turn) - base
            if length + extra > target:
                misses += 1
                if length >= min_tokens and misses > 3:
                    break
                continue
            messages += turn
            length += extra
        if messages and min_tokens <= _length(tokenizer, messages) <= max_tokens:  # exact, once per row
            out.append({"messages": messages})
    return out


def _length(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--min", type=int, default=40, dest="min_tokens")
    parser.add_argument("--max", type=int, default=250, dest="max_tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = build_chats(args.rows, args.min_tokens, args.max_tokens, args.seed)
    wordnet_data.write_jsonl(rows, args.out)
    print(f"wrote {len(rows):,} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
