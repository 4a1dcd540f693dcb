"""Chat templates and exact answer masks.

A conversation is rendered with the tokenizer's own chat template (``chat_template: auto``), or
lorakit's plain template when asked for (``chat_template: plain``), and tokenised in one piece, exactly as the model will see it at inference. Which
tokens are trained is decided in *character* space and mapped to tokens by their offsets:

- templates with ``{% generation %}`` markers give the assistant spans directly;
- for every other template the span of assistant turn i is found by rendering prefixes:
  ``render(messages[:i], add_generation_prompt=True)`` ends where the answer starts and
  ``render(messages[:i+1])`` ends where the turn ends (trailing whitespace after the end-of-turn
  token belongs to the next prompt). Both renders must be prefixes of the full conversation;
  a template for which they are not (e.g. one that rewrites earlier turns) is refused with a
  clear error rather than guessed at.

A token is trained when its first character lies inside an answer span, so the end-of-turn token
(``<|im_end|>``, ``</s>``, ``<|eot_id|>``) is trained — the model learns to stop.

A tokenizer without a chat template gets none under ``auto``: a conversation is then refused
(:class:`NoChatTemplate`) rather than silently rendered in a format the model's serving stack will
not use; ``plain`` or a Jinja template is the user's explicit choice. Text and pre-tokenised rows
need no template.
"""

from __future__ import annotations

import re
from typing import Any

from lorakit.errors import LorakitError

IGNORE = -100

# lorakit's own template (``chat_template: plain``), for tokenizers without one: readable markers and the EOS token after
# each answer so that generation stops. Like plain text, it is tokenised with the tokenizer's own
# special tokens (BOS for Llama-style tokenizers).
PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}### System:\n{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}### User:\n{{ message['content'] }}\n\n"
    "{% else %}### Assistant:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:\n{% endif %}"
)
_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class NoChatTemplate(LorakitError):
    """A conversation was to be rendered under ``chat_template: auto`` and the tokenizer has no template."""

    def __init__(self, tokenizer: Any):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        super().__init__(
            f"`messages` rows need a chat template and the tokenizer of {name} has none (data.chat_template: "
            "auto); set data.chat_template: plain for lorakit's '### User:' / '### Assistant:' template "
            "(--chat-template plain for `lorakit data check` and `lorakit eval`), or give a Jinja template")


def resolve_template(tokenizer: Any, setting: str = "auto") -> str:
    """The Jinja template to render conversations with.

    Args:
        tokenizer: a transformers tokenizer.
        setting: ``auto`` (the tokenizer's template), ``plain`` (:data:`PLAIN_TEMPLATE`), or a
            Jinja template string.

    Returns:
        The template source; ``""`` for ``auto`` when the tokenizer has no template (rendering a
        conversation with it raises :class:`NoChatTemplate`; text rows need none).
    """
    if setting == "plain":
        return PLAIN_TEMPLATE
    if setting == "auto":
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        return own or ""
    if "{{" not in setting and "{%" not in setting:
        raise LorakitError(f"data.chat_template: expected 'auto', 'plain' or a Jinja template, got {setting!r}")
    return setting


def has_generation_markers(template: str) -> bool:
    """Whether ``template`` marks assistant text with ``{% generation %}`` blocks."""
    return bool(_GENERATION.search(template))


def render(tokenizer: Any, template: str, messages: list[dict[str, str]], *,
           add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with ``template``.

    Returns:
        The text and, for templates with generation markers, the character spans of the
        ``{% generation %}`` blocks (otherwise an empty list).

    Raises:
        NoChatTemplate: ``template`` is empty (``auto`` for a tokenizer without a template).
        LorakitError: the template failed on these messages.
    """
    if not template:
        raise NoChatTemplate(tokenizer)
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        texts, spans = render_jinja_template(
            conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt,
            return_assistant_tokens_mask=has_generation_markers(template), **tokenizer.special_tokens_map)
    except Exception as err:  # a Jinja error or raise_exception() inside the template
        raise LorakitError(f"the chat template failed to render this conversation: {err}") from None
    return texts[0], [tuple(s) for s in (spans[0] if spans else [])]


def answer_spans(tokenizer: Any, template: str, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn, in order.

    Raises:
        LorakitError: when the template renders prefixes inconsistently.
    """
    full, marked = render(tokenizer, template, messages)
    if has_generation_markers(template):
        return full, marked
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, _ = render(tokenizer, template, messages[:i], add_generation_prompt=True)
        through, _ = render(tokenizer, template, messages[: i + 1])
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise LorakitError(
                f"the chat template renders turn {i} differently once later turns follow, so answer masks "
                "cannot be computed from prefixes; use a template with {% generation %} markers "
                "(data.chat_template) or chat_template: plain")
        end = len(through.rstrip())
        spans.append((len(before), max(end, len(before))))
    return full, spans


def encode_chat(tokenizer: Any, template: str, messages: list[dict[str, str]], *,
                train_on_inputs: bool = False, last_turn_only: bool = False) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation.

    Args:
        tokenizer: a fast transformers tokenizer (offsets are needed).
        template: from :func:`resolve_template`.
        messages: validated ``{"role", "content"}`` messages.
        train_on_inputs: label every token, prompts included.
        last_turn_only: label only the final assistant turn.

    Returns:
        ``(input_ids, labels)`` of equal length; labels are ``IGNORE`` where no loss is taken and
        equal ``input_ids`` elsewhere (not shifted: the model shifts).
    """
    full, spans = answer_spans(tokenizer, template, messages)
    # Real chat templates write their own BOS; the plain template relies on the tokenizer for it.
    encoded = tokenizer(full, add_special_tokens=template == PLAIN_TEMPLATE, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    if last_turn_only:
        spans = spans[-1:]
    return ids, _labels_from_spans(ids, encoded["offset_mapping"], spans)


def _labels_from_spans(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    # Both lists are sorted, so one pass assigns each token to the span holding its first character.
    labels = [IGNORE] * len(ids)
    k = 0
    for j, (start, _end) in enumerate(offsets):
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if spans[k][0] <= start:
            labels[j] = ids[j]
    return labels


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """Plain text: the tokenizer's own special tokens (e.g. BOS) plus EOS at the end, all trained."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    return ids, list(ids)
