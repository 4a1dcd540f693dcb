"""Per-request sampling parameters and one batched sampling step.

The parameters follow OpenAI's / vLLM's names and meanings, so the HTTP layer passes them through.
Every row of a batch has its own parameters and its own ``torch.Generator``: a request with a
``seed`` produces the same tokens whatever else shares its batch.

One step over the batch (B rows, vocabulary V): greedy rows take ``argmax``; the others divide by
their temperature, keep their top-k and their top-p nucleus of the sorted distribution (at least
one token), and draw one token with their own generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.errors import LorakitError
from lorakit.serve.logprobs import MAX_LOGPROBS


@dataclass
class SamplingParams:
    """How one request is decoded."""

    max_tokens: int | None = 16
    """New tokens to generate at most; None = up to the context length."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens cannot be drawn before this many new tokens."""
    temperature: float = 1.0
    """0 = greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    top_k: int = 0
    """Keep only the ``top_k`` most likely tokens (0 or -1: all)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the generation; the text is cut before the first one found."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the generation (in addition to the model's end-of-sequence ids)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (benchmarks)."""
    include_stop_str_in_output: bool = False
    """Keep the stop string at the end of the text."""
    seed: int | None = None
    """Seed of this request's own random generator: the same seed gives the same tokens."""
    logprobs: int | None = None
    """Return each generated token's logprob and this many alternatives (0…20); None: none."""
    prompt_logprobs: int | None = None
    """Return each prompt token's logprob (the first: None) and this many alternatives; None: none."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and (isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int)
                                            or self.max_tokens < 1):
            raise LorakitError(f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise LorakitError(f"min_tokens must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise LorakitError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise LorakitError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise LorakitError(f"top_k must be an integer >= 0 (0 or -1: no limit), got {self.top_k!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise LorakitError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise LorakitError(f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise LorakitError(f"seed must be an integer, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise LorakitError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (or None), got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``logits`` (B, V), each row by its own parameters and generator."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1).tolist()  # greedy for every row; sampled rows overwrite theirs
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return tokens
    index = torch.tensor(rows, device=logits.device)
    temps = torch.tensor([params[i].temperature for i in rows], device=logits.device).unsqueeze(1)
    scaled = logits.index_select(0, index) / temps  # (S, V)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    ks = torch.tensor([params[i].top_k if params[i].top_k > 0 else vocab for i in rows], device=logits.device)
    position = torch.arange(vocab, device=logits.device).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(position >= ks.unsqueeze(1), float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    ps = torch.tensor([params[i].top_p for i in rows], device=logits.device).unsqueeze(1)
    before = probs.cumsum(dim=-1) - probs  # probability mass of the tokens ranked above each one
    probs = probs.masked_fill(before >= ps, 0.0)  # the first token always stays (before = 0)
    for j, row in enumerate(rows):
        pick = torch.multinomial(probs[j], 1, generator=generators[row])
        tokens[row] = int(order[j, pick])
    return tokens
