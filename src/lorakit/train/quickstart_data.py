"""Build the quickstart's data set from WordNet 3.0 (Debian package ``wordnet-base``).

The task: asked to define a word, answer with one line of JSON,
``{"word": "harbor", "pos": "noun", "definition": "a sheltered port where ships can take on or discharge cargo"}``.
A small instruction model answers in prose; after a few minutes of LoRA training it answers in
this format, which the quickstart measures (valid JSON with the three fields, the right word).

Words: the most frequent single-word lemmas of WordNet (by sense-tagged count), their most
frequent sense, each word once, glosses of 3-14 words (examples after ``;`` dropped). Licence: WordNet 3.0,
Copyright 2006 by Princeton University, a permissive licence (see ``quickstart_NOTICE.txt``).

Rebuild::

    apt-get download wordnet-base && dpkg-deb -x wordnet-base_*.deb wn
    python -m lorakit.train.quickstart_data wn/usr/share/wordnet src/lorakit/train
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

POS = {"noun": "noun", "verb": "verb", "adj": "adjective"}
PER_POS = {"noun": 150, "verb": 60, "adj": 60}
EVAL_ROWS = 40
PROMPTS = ("Define the word \"{w}\".", "What does \"{w}\" mean?", "Define: {w}", "Give the meaning of \"{w}\".")


def gloss_of(data: dict[str, str], offset: str) -> str:
    """The definition part of a synset's gloss (before the first example or ``;``)."""
    gloss = data[offset].split(" | ", 1)[1].strip()
    return gloss.split(";")[0].strip().strip('"').strip()


def build(wordnet: Path) -> list[dict]:
    rows, seen = [], set()
    for pos, count in PER_POS.items():
        data = {}
        for line in (wordnet / f"data.{pos}").read_text(errors="replace").splitlines():
            if not line.startswith("  "):
                data[line.split(" ", 1)[0]] = line
        candidates = []
        for line in (wordnet / f"index.{pos}").read_text(errors="replace").splitlines():
            if line.startswith("  "):
                continue
            parts = line.split()
            lemma, n_synsets, n_pointers = parts[0], int(parts[2]), int(parts[3])
            tagged = int(parts[5 + n_pointers])
            offsets = parts[6 + n_pointers:6 + n_pointers + n_synsets]
            if not lemma.isalpha() or len(lemma) < 3 or tagged < 5:
                continue
            definition = gloss_of(data, offsets[0])
            if 3 <= len(definition.split()) <= 14 and "(" not in definition:
                candidates.append((tagged, lemma, definition))
        candidates.sort(key=lambda c: -c[0])
        fresh = [(w, d) for _, w, d in candidates if w not in seen][:count]  # each word once, in one sense
        seen.update(w for w, _ in fresh)
        rows += [{"word": w, "pos": POS[pos], "definition": d} for w, d in fresh]
    return rows


def to_row(item: dict, rng: random.Random) -> dict:
    prompt = rng.choice(PROMPTS).format(w=item["word"])
    answer = json.dumps(item, ensure_ascii=False)
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}


def main(argv: list[str]) -> None:
    wordnet, out = Path(argv[0]), Path(argv[1])
    rng = random.Random(0)
    items = build(wordnet)
    rng.shuffle(items)
    rows = [to_row(item, rng) for item in items]
    for name, part in (("quickstart_eval.jsonl", rows[:EVAL_ROWS]), ("quickstart.jsonl", rows[EVAL_ROWS:])):
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        print(f"{out / name}: {len(part)} rows")


if __name__ == "__main__":
    main(sys.argv[1:])
