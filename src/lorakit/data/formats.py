"""Data formats: detect them from a row's fields and bring every row to one canonical form.

| format       | fields                                               | becomes            |
|--------------|------------------------------------------------------|--------------------|
| `messages`   | `messages`: [{role, content}] (OpenAI)               | a conversation     |
| `sharegpt`   | `conversations`: [{from, value}]                     | a conversation     |
| `alpaca`     | `instruction`, `output`, optional `input`, `system`  | a conversation     |
| `completion` | `prompt`, `completion` (strings or message lists)    | a conversation     |
| `text`       | `text`                                               | plain text         |
| `tokens`     | `input_ids`, optional `labels`                       | tokens as given    |

Every chat-like format becomes the same list of ``{"role", "content"}`` messages, so the same
conversation gives identical tokens and labels whichever format it was written in. A
conversation is an optional system message, then user and assistant turns alternating, ending
with an assistant turn (the answer the model learns).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lorakit.data.readers import BadRow, Row

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}

# Detection order: the first format whose fields are all present wins.
SIGNATURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("messages", ("messages",)),
    ("sharegpt", ("conversations",)),
    ("tokens", ("input_ids",)),
    ("alpaca", ("instruction", "output")),
    ("completion", ("prompt", "completion")),
    ("text", ("text",)),
)
EXPECTED = "no 'messages', 'text', 'prompt'/'completion', 'instruction'/'output', 'conversations' or 'input_ids' field"


@dataclass(frozen=True)
class Sample:
    """A row in canonical form: exactly one of ``messages``, ``text`` or ``input_ids`` is set."""

    where: str
    line: int
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str | None = None
    input_ids: list[int] | None = None
    labels: list[int] | None = None


def detect_format(row: Row) -> str:
    """The format whose fields ``row`` has (see the module table).

    Raises:
        BadRow: when no format fits; the message lists the fields found.
    """
    for name, needed in SIGNATURES:
        if all(key in row.data for key in needed):
            return name
    found = ", ".join(repr(k) for k in row.data) or "none"
    raise BadRow(row.where, f"{EXPECTED} (found: {found})", row.line)


def to_sample(row: Row, fmt: str) -> Sample:
    """Validate ``row`` as format ``fmt`` and convert it.

    Raises:
        BadRow: naming the field and what was expected.
    """
    convert = {"messages": _messages, "sharegpt": _sharegpt, "alpaca": _alpaca,
               "completion": _completion, "text": _text, "tokens": _tokens}[fmt]
    return convert(row)


def _field(row: Row, key: str, fmt: str) -> Any:
    if key not in row.data or row.data[key] is None:
        found = ", ".join(repr(k) for k in row.data) or "none"
        raise BadRow(row.where, f"missing field '{key}' (format '{fmt}'; found: {found})", row.line)
    return row.data[key]


def _string(row: Row, key: str, fmt: str, *, required: bool = True, nonempty: bool = True) -> str:
    value = _field(row, key, fmt) if required else row.data.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(row.where, f"field '{key}' must be a string, got {type(value).__name__}", row.line)
    if nonempty and not value.strip():
        raise BadRow(row.where, f"field '{key}' is empty", row.line)
    return value


def _list(row: Row, key: str, fmt: str) -> list:
    value = _field(row, key, fmt)
    if isinstance(value, str):  # CSV and Parquet cells can hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, list) or not value:
        raise BadRow(row.where, f"field '{key}' must be a non-empty list, got {_short(value)}", row.line)
    return value


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def _content(row: Row, path: str, value: Any) -> str:
    # OpenAI content may be a list of parts; only text parts can be trained on.
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRow(row.where, f"{path}: only text parts are supported, got {_short(part)}", row.line)
            parts.append(part["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        raise BadRow(row.where, f"{path} must be a string, got {type(value).__name__}", row.line)
    return value


def _conversation(row: Row, key: str, items: list, role_key: str, text_key: str,
                  roles: dict[str, str]) -> list[dict[str, str]]:
    messages = []
    for i, item in enumerate(items):
        path = f"field '{key}'[{i}]"
        if not isinstance(item, dict):
            raise BadRow(row.where, f"{path} must be an object with '{role_key}' and '{text_key}'", row.line)
        role = item.get(role_key)
        if not isinstance(role, str) or role not in roles:  # a list or object as role is no key to look up
            shown = repr(role) if isinstance(role, str) else _short(role)
            raise BadRow(row.where, f"{path}.{role_key}: unknown role {shown} "
                                    f"(expected one of {', '.join(roles)})", row.line)
        if text_key not in item:
            raise BadRow(row.where, f"{path}: missing '{text_key}'", row.line)
        messages.append({"role": roles[role], "content": _content(row, f"{path}.{text_key}", item[text_key])})
    check_turns(row, key, messages)
    return messages


def check_turns(row: Row, key: str, messages: list[dict[str, str]]) -> None:
    """Require [system], user, assistant, user, assistant, …, ending with a non-empty answer.

    Raises:
        BadRow: naming the first message out of order.
    """
    start = 1 if messages and messages[0]["role"] == "system" else 0
    for i, message in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise BadRow(row.where, f"field '{key}'[{i}]: expected a '{expected}' turn, got '{message['role']}' "
                                    "(roles must go [system], user, assistant, user, assistant, …)", row.line)
    if len(messages) == start or messages[-1]["role"] != "assistant":
        raise BadRow(row.where, f"field '{key}': the conversation has no final assistant answer to learn from",
                     row.line)
    for i, message in enumerate(messages):
        if message["role"] == "assistant" and not message["content"].strip():
            raise BadRow(row.where, f"field '{key}'[{i}]: the assistant answer is empty", row.line)


def _messages(row: Row) -> Sample:
    items = _list(row, "messages", "messages")
    messages = _conversation(row, "messages", items, "role", "content", {r: r for r in ROLES})
    return Sample(row.where, row.line, messages=messages)


def _sharegpt(row: Row) -> Sample:
    items = _list(row, "conversations", "sharegpt")
    messages = _conversation(row, "conversations", items, "from", "value", SHAREGPT_ROLES)
    return Sample(row.where, row.line, messages=messages)


def _alpaca(row: Row) -> Sample:
    instruction = _string(row, "instruction", "alpaca")
    extra = _string(row, "input", "alpaca", required=False, nonempty=False)
    output = _string(row, "output", "alpaca")
    system = _string(row, "system", "alpaca", required=False, nonempty=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return Sample(row.where, row.line, messages=messages)


def _completion(row: Row) -> Sample:
    prompt, completion = _field(row, "prompt", "completion"), _field(row, "completion", "completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        prompt = _list(row, "prompt", "completion")
        completion = _list(row, "completion", "completion")
        messages = _conversation(row, "prompt+completion", prompt + completion, "role", "content",
                                 {r: r for r in ROLES})
        return Sample(row.where, row.line, messages=messages)
    prompt = _string(row, "prompt", "completion")
    completion = _string(row, "completion", "completion")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Sample(row.where, row.line, messages=messages)


def _text(row: Row) -> Sample:
    return Sample(row.where, row.line, text=_string(row, "text", "text"))


def _ints(row: Row, key: str, *, allow_ignore: bool) -> list[int]:
    values = _list(row, key, "tokens")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, int) or (value < 0 and not (allow_ignore and value == -100)):
            raise BadRow(row.where, f"field '{key}'[{i}]: expected a token id (integer >= 0"
                                    f"{' or -100' if allow_ignore else ''}), got {value!r}", row.line)
    return values


def _tokens(row: Row) -> Sample:
    input_ids = _ints(row, "input_ids", allow_ignore=False)
    labels = _ints(row, "labels", allow_ignore=True) if row.data.get("labels") is not None else list(input_ids)
    if len(labels) != len(input_ids):
        raise BadRow(row.where, f"field 'labels' has {len(labels)} values but 'input_ids' has {len(input_ids)}",
                     row.line)
    return Sample(row.where, row.line, input_ids=input_ids, labels=labels)
