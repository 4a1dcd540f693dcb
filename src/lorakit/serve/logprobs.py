"""Log-probabilities of tokens, from the logits the engine computes, and their OpenAI shapes.

What a logprob is here (as in vLLM): ``log_softmax`` in fp32 of the model's raw logits at that
position — the adapter's own distribution, before temperature, top-k/top-p or ``min_tokens``
change what is sampled. Each token gets its own logprob and the ``k`` most likely tokens with
theirs (:class:`TokenLogprob`); both come from the same fp32 tensor, so a token that is the most
likely has exactly the top logprob (lm-evaluation-harness' ``is_greedy`` compares them with ``==``).

- Generated tokens: from the logits row each token was sampled from (:func:`pick`).
- Prompt tokens (``prompt_logprobs``, the ``echo`` of ``/v1/completions``): position ``t``'s
  distribution scores token ``t + 1``; the first token has none (``None``, as OpenAI and vLLM
  return it). :func:`of_prompt` computes them from the last hidden states in chunks of positions,
  so the (T × vocab) logits never exist at once.

The response shapes: :func:`completion_logprobs` (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and :func:`chat_logprobs` (``content``: ``token``, ``logprob``,
``bytes``, ``top_logprobs``). Token strings are each token decoded alone with its special tokens
(:class:`TokenStrings`); ``text_offset`` is the running sum of their lengths, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

MAX_LOGPROBS = 20  # the most alternatives per token a request may ask for (vLLM's default max_logprobs)
CHUNK_BYTES = 1 << 26  # fp32 logits per chunk of prompt positions: 64 MiB


@dataclass(frozen=True)
class TokenLogprob:
    """One token's logprob and the ``k`` most likely tokens at its position (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def pick(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """``TokenLogprob`` of ``tokens`` (n,) under ``logits`` (n, vocab), with the top ``k`` of each row."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens.view(-1, 1)).view(-1).tolist()
    if k > 0:
        values, ids = logprobs.topk(k, dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(chosen)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens.view(-1).tolist(), chosen, tops)]


def of_prompt(logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, tokens: list[int],
              k: int) -> list[TokenLogprob | None]:
    """Prompt logprobs: ``[None, lp(t1 | t0), …, lp(t_{n-1} | …)]`` for one row.

    Args:
        logits: maps hidden states (m, d) to fp32 logits (m, vocab) (the model's head).
        hidden: the row's last hidden states (n, d), one per prompt token.
        tokens: the prompt (n,).
        k: alternatives per position.
    """
    n = len(tokens)
    targets = torch.tensor(tokens[1:], dtype=torch.long, device=hidden.device)
    out: list[TokenLogprob | None] = [None]
    vocab = None
    start = 0
    while start < n - 1:
        step = 64 if vocab is None else max(1, CHUNK_BYTES // (4 * vocab))
        stop = min(n - 1, start + step)
        chunk = logits(hidden[start:stop])  # (m, vocab): positions start…stop-1 score tokens start+1…stop
        vocab = chunk.shape[-1]
        out += pick(chunk, targets[start:stop], k)
        start = stop
    return out


class TokenStrings:
    """Each token id decoded alone (special tokens kept), cached: the strings logprobs are keyed by."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            if len(self._cache) < 1 << 20:
                self._cache[token] = text
        return text


def completion_logprobs(tokens: list[int], entries: list[TokenLogprob | None], strings: TokenStrings,
                        offset: int = 0) -> dict[str, list[Any]]:
    """``/v1/completions``' ``logprobs`` object for ``tokens`` and their ``entries`` (``None``: a
    prompt's first token, which no distribution scores).

    ``top_logprobs`` maps token strings to logprobs: the token itself, then its ``k`` alternatives
    (two tokens that decode alike share one key, the more likely one's value).
    """
    texts, token_logprobs, top_logprobs, text_offset = [], [], [], []
    for token, entry in zip(tokens, entries):
        text = strings(token)
        text_offset.append(offset)
        texts.append(text)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(entry.logprob)
        top = {text: entry.logprob}
        for alternative, logprob in entry.top:
            key = strings(alternative)
            top[key] = max(logprob, top.get(key, float("-inf")))
        top_logprobs.append(top)
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings) -> dict[str, Any]:
    """``/v1/chat/completions``' ``logprobs`` object: ``{"content": [...], "refusal": None}``."""
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = strings(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    content = [{**item(e.token, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
