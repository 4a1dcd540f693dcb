"""Prompts as token ids, and the facts of a model that bound them (context length, end tokens).

One place turns what a client sends — text, chat messages, token ids — into the token ids the
engine runs, so that ``/v1/completions``, ``/v1/chat/completions`` and ``/tokenize`` agree token
for token: text is tokenized with the tokenizer's special tokens (as the model saw text in
training) unless told otherwise; messages go through the tokenizer's chat template with the
generation prompt and are tokenized without adding special tokens again; token ids are checked
against the vocabulary here, so one bad request cannot fail a batched prefill.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import LorakitError


def tokenize_prompt(tokenizer: Any, vocab: int, prompt: str | None = None, messages: list[dict] | None = None,
                    prompt_ids: list[int] | None = None, add_special_tokens: bool | None = None,
                    add_generation_prompt: bool = True, allow_empty: bool = False) -> list[int]:
    """The token ids of exactly one of ``prompt``, ``messages`` or ``prompt_ids``.

    Args:
        add_special_tokens: default True for text, False for messages (their template has them).
        allow_empty: no error for an empty result (``/tokenize`` of ``""``).

    Raises:
        LorakitError: none or several given, no chat template, ids outside the vocabulary, empty.
    """
    given = [x is not None for x in (prompt, messages, prompt_ids)]
    if sum(given) != 1:
        raise LorakitError("give exactly one of prompt, messages or prompt_ids")
    if messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise LorakitError("this tokenizer has no chat template; send a plain prompt instead of messages")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids = tokenizer(text, add_special_tokens=bool(add_special_tokens))["input_ids"]
    elif prompt is not None:
        ids = tokenizer(prompt, add_special_tokens=add_special_tokens is not False)["input_ids"]
    else:
        ids = [int(t) for t in prompt_ids]
        if not all(0 <= t < vocab for t in ids):
            raise LorakitError(f"prompt token ids must lie in [0, {vocab}) for this model; got "
                               f"{[t for t in ids if not 0 <= t < vocab][:5]}")
    if not ids and not allow_empty:
        raise LorakitError("the prompt is empty: it must hold at least one token")
    return list(ids)


def model_context(model: nn.Module) -> int:
    """The longest sequence (prompt + generated) the engine runs for ``model``."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    window = getattr(config, "sliding_window", None)
    # The batch cache keeps every column; past a sliding window the model's own cache would drop some.
    return min(limit, window) if isinstance(window, int) and window > 0 else limit


def eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Every end-of-sequence token id the model's generation config, config or tokenizer names."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids
