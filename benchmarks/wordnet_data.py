"""A realistic instruction data set from WordNet, for benchmarks (packing, training).

Each row asks for the definition of one word and answers with its WordNet gloss, in OpenAI
``messages`` format::

    {"messages": [{"role": "user", "content": "Define the word 'able' (adjective)."},
                  {"role": "assistant", "content": "Having the necessary means or skill ... to do
                   something. Example: \"able to swim\"."}]}

Why WordNet: 117,659 synsets whose glosses run from three words to several sentences, about a
quarter of them with usage examples, give the long-tailed length mix of real instruction data,
and Debian ships them in a small package (``wordnet-base``, 6.5 MB) that needs no model hub.

Source and licence: WordNet 3.0, Copyright 2006 by Princeton University, under the WordNet
3.0 licence (permissive: use, copy, modify and distribute for any purpose without fee, keeping
the copyright notice and the "AS IS" disclaimer; see
/usr/share/doc/wordnet-base/copyright inside the package). The generated rows are derived from
the WordNet database and fall under that licence.

Where the files come from, first hit wins:

1. ``lorakit.models.cache_dir() / "datasets" / "wordnet"`` holding ``data.noun`` …
   ``data.adv`` (and the package's ``copyright``);
2. ``apt-get download wordnet-base`` into a temporary folder, ``dpkg-deb -x``, then the four
   data files and the copyright are copied into that cache folder.

The ``data.*`` line format (wndb(5WN))::

    offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt [ptr ...] [frames] | gloss

Words use ``_`` for spaces and adjectives may carry a syntactic marker (``(a)``, ``(p)``,
``(ip)``). The gloss is a definition followed by usage examples in double quotes, each after
``; `` (a few after ``: ``), sometimes with an attribution (``"..." - Mark Twain``); a few
definitions quote a phrase themselves (``as in "on the job"``). Lines of the licence header
start with two spaces.

Usage::

    python benchmarks/wordnet_data.py --rows 2000 --out wordnet.jsonl
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARTS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
DATA_FILES = tuple(f"data.{part}" for part in PARTS)
PACKAGE = "wordnet-base"
ADJ_MARKER = re.compile(r"\((a|p|ip)\)$")
QUOTED = re.compile(r'"([^"]*)"')
EXAMPLE_START = re.compile(r'(^|[;:])\s*"')


@dataclass(frozen=True)
class Synset:
    """One WordNet synset: its words, part of speech, definition and usage examples."""

    words: tuple[str, ...]
    """Lemmas with spaces, adjective markers removed, in WordNet's order."""
    pos: str
    """``noun``, ``verb``, ``adjective`` or ``adverb``."""
    definition: str
    examples: tuple[str, ...]


def parse_line(line: str, pos: str) -> Synset | None:
    """Parse one ``data.*`` line; None for licence header lines and synsets without a definition."""
    if line.startswith("  ") or "|" not in line:
        return None
    head, gloss = line.split("|", 1)
    fields = head.split()
    count = int(fields[3], 16)  # w_cnt is two hex digits
    words = tuple(ADJ_MARKER.sub("", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
    definition, examples = split_gloss(gloss)
    if not definition:
        return None
    return Synset(words, pos, definition, examples)


def split_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """``(definition, examples)``: the definition ends at the first quote that opens the gloss or
    follows ``;`` or ``:``; quotes before it (``as in "carrot and stick"``) belong to the definition."""
    gloss = gloss.strip()
    first = EXAMPLE_START.search(gloss)
    if first is None:
        return gloss.rstrip("; ").strip(), ()
    definition = gloss[:first.start()].rstrip(";: ").strip()
    examples = tuple(e.strip() for e in QUOTED.findall(gloss[first.end() - 1:]) if e.strip())
    return definition, examples


def read_synsets(folder: Path) -> list[Synset]:
    """Every synset with a definition from the four ``data.*`` files in ``folder``."""
    synsets = []
    for part, pos in PARTS.items():
        with open(folder / f"data.{part}", encoding="utf-8") as f:
            for line in f:
                synset = parse_line(line, pos)
                if synset is not None:
                    synsets.append(synset)
    return synsets


def wordnet_dir(cache: Path | None = None) -> Path:
    """The folder holding WordNet's ``data.*`` files, fetched from Debian once if needed.

    Args:
        cache: where the extracted files are kept (default
            ``lorakit.models.cache_dir() / "datasets" / "wordnet"``).

    Returns:
        The folder.

    Raises:
        RuntimeError: when the package cannot be downloaded or unpacked (no ``apt-get`` or
            ``dpkg-deb``, no network, or no package list: run ``apt-get update``).
    """
    if cache is None:
        from lorakit.models import cache_dir

        cache = cache_dir() / "datasets" / "wordnet"
    if all((cache / name).is_file() for name in DATA_FILES):
        return cache
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"cannot fetch WordNet: '{tool}' not found. Put {', '.join(DATA_FILES)} "
                               f"from the Debian package {PACKAGE} (or WordNet 3.0's dict/ folder) into {cache}")
    with tempfile.TemporaryDirectory() as tmp:
        _run(["apt-get", "download", PACKAGE], cwd=tmp)
        debs = sorted(Path(tmp).glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download {PACKAGE} produced no .deb file in {tmp}")
        _run(["dpkg-deb", "-x", str(debs[0]), "root"], cwd=tmp)
        found = list(Path(tmp, "root").rglob("data.noun"))
        if not found:
            raise RuntimeError(f"{debs[0].name} holds no data.noun; is it the WordNet 3.0 package?")
        source = found[0].parent
        staging = cache.with_name(cache.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in DATA_FILES:
            shutil.copy2(source / name, staging / name)
        licence = Path(tmp, "root", "usr", "share", "doc", PACKAGE, "copyright")
        if licence.is_file():
            shutil.copy2(licence, staging / "copyright")
        shutil.rmtree(cache, ignore_errors=True)
        staging.rename(cache)  # the cache folder appears complete or not at all
    return cache


def _run(command: list[str], cwd: str) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        hint = " (run 'apt-get update' first if the package list is empty)" if command[0] == "apt-get" else ""
        raise RuntimeError(f"cannot fetch WordNet: '{' '.join(command)}' failed with exit code "
                           f"{e.returncode}{hint}: {(e.stderr or e.stdout).strip()}") from e


def to_row(synset: Synset) -> dict:
    """The ``messages`` row for a synset: its first word asked, definition (+ first example) answered."""
    word = synset.words[0]
    answer = synset.definition[0].upper() + synset.definition[1:]
    if not answer.endswith((".", "!", "?")):
        answer += "."
    if synset.examples:
        answer += f' Example: "{synset.examples[0]}".'
    return {"messages": [{"role": "user", "content": f"Define the word '{word}' ({synset.pos})."},
                         {"role": "assistant", "content": answer}]}


def build_rows(rows: int | None = None, seed: int = 0, cache: Path | None = None) -> list[dict]:
    """``rows`` rows drawn without replacement from every synset with a seeded permutation.

    Args:
        rows: how many (None or more than there are: all of them, shuffled).
        seed: the permutation's seed; the same seed gives the same rows in the same order.
        cache: see :func:`wordnet_dir`.

    Returns:
        The rows, each ``{"messages": [user, assistant]}``.
    """
    synsets = read_synsets(wordnet_dir(cache))
    order = np.random.default_rng(seed).permutation(len(synsets))
    if rows is not None:
        order = order[:rows]
    return [to_row(synsets[i]) for i in order]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    """Write ``rows`` as JSON lines (UTF-8) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows to write (default 2000; 0 = all 117,659)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", type=Path, required=True, help="output .jsonl file")
    parser.add_argument("--cache", type=Path, default=None,
                        help="folder for the extracted WordNet files (default: lorakit cache)/datasets/wordnet")
    args = parser.parse_args(argv)
    try:
        rows = build_rows(args.rows or None, args.seed, args.cache)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    write_jsonl(rows, args.out)
    with_example = sum(' Example: "' in r["messages"][1]["content"] for r in rows)
    print(f"wrote {len(rows):,} rows ({with_example:,} with an example) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
