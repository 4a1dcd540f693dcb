"""Helpers for the data tests: the real SmolLM2 tokenizer, copies with other chat templates, writers.

Not a conftest.py: ``from conftest import make_tiny`` must keep finding tests/conftest.py.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

# Llama-2 / Mistral style: no generation prompt, answers followed by EOS, no generation markers.
INST_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)
# ChatML with {% generation %} markers around what the assistant writes.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@functools.cache
def smol_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer (ChatML template with a default system prompt)."""
    from lorakit.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def with_template(tokenizer, template: str | None):
    """A copy of ``tokenizer`` whose own chat template is ``template`` (None: no template)."""
    clone = copy.deepcopy(tokenizer)
    clone.chat_template = template
    return clone


@functools.cache
def inst_tokenizer():
    """SmolLM2's vocabulary with a Llama-2/Mistral ``[INST]`` template as its own."""
    return with_template(smol_tokenizer(), INST_TEMPLATE)


@functools.cache
def bare_tokenizer():
    """SmolLM2's vocabulary without any chat template (the plain fallback applies)."""
    return with_template(smol_tokenizer(), None)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written as-is) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def marked(tokenizer, ids, labels) -> list[tuple[str, bool]]:
    """(token text, trained) for each token: the form masks are asserted in."""
    return [(tokenizer.decode([int(i)]), int(label) != -100) for i, label in zip(ids, labels)]
