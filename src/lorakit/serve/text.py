"""The text side of one request: tokens to streamed text, stop tokens and stop strings.

Text is decoded from all the request's tokens at each step (so multi-token characters and
tokenizers that merge spaces come out as the tokenizer writes them), and released to the stream
only once final: the tail that could still become a stop string (``max(len(stop)) - 1``
characters) and an incomplete UTF-8 character (``\\ufffd`` at the end) are held back until the
next token or the end. A stop string cuts the text before it (or after it, with
``include_stop_str_in_output``); a stop token (end-of-sequence or ``stop_token_ids``) ends the
request and is kept in the token ids but not in the text.
"""

from __future__ import annotations

from typing import Any

from lorakit.serve.sampling import SamplingParams


class TextStream:
    """Incremental text of one request."""

    def __init__(self, tokenizer: Any, params: SamplingParams, eos_ids: set[int], max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_ids)
        self.max_tokens = max_tokens
        self.hold = max(map(len, params.stop), default=1) - 1  # characters a stop string could still claim
        self.text = ""  # the text released so far
        self.finish_reason: str | None = None

    def push(self, tokens: list[int]) -> str:
        """Take the request's tokens after a new one; return the newly final text.

        Sets :attr:`finish_reason` (``stop`` or ``length``) when this token ends the request.
        """
        hidden = 1 if tokens[-1] in self.stop_ids else 0
        if hidden:
            self.finish_reason = "stop"
        text = self.tokenizer.decode(tokens[: len(tokens) - hidden], skip_special_tokens=True)
        if self.params.stop:
            cut = _find_stop(text, self.params.stop, max(0, len(self.text) - self.hold))
            if cut is not None:
                start, end = cut
                text = text[: end if self.params.include_stop_str_in_output else start]
                self.finish_reason = "stop"
        if self.finish_reason is None and len(tokens) >= self.max_tokens:
            self.finish_reason = "length"
        ready = len(text)
        if self.finish_reason is None:
            ready = min(len(text.rstrip("\ufffd")), len(text) - self.hold)
        delta = text[len(self.text): max(ready, len(self.text))]
        self.text += delta
        return delta


def _find_stop(text: str, stops: list[str], start: int) -> tuple[int, int] | None:
    """(start, end) of the earliest stop string in ``text[start:]``, or None."""
    found = [(i, i + len(s)) for s in stops if (i := text.find(s, start)) >= 0]
    return min(found) if found else None
