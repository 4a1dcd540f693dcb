"""OpenAI's wire format for the HTTP server: request bodies in, response bodies and stream chunks out.

Requests are parsed strictly, as OpenAI's own API does: a body that is not JSON, a field of the
wrong type (``"0.5"`` for a number), an unknown field (``max_token``) or a parameter lorakit does
not implement (``best_of``, penalties, ``tools``…) is an :class:`APIError` (400) that names the
parameter, never silently ignored. vLLM's sampling extensions (``top_k``, ``min_tokens``,
``stop_token_ids``, ``ignore_eos``, ``include_stop_str_in_output``) are accepted.

Completions take a prompt as a string, a list of strings, a list of token ids or a list of such
lists; each prompt gets ``n`` choices (``index = prompt · n + j``; choice ``j`` samples with
``seed + j`` when a seed is given). ``logprobs: k`` returns each token's logprob and ``k``
alternatives, ``echo: true`` prepends the prompt (and, with ``logprobs``, its tokens' logprobs,
the first ``null``). Chat takes ``logprobs: true`` and ``top_logprobs: k``.

Defaults follow OpenAI: ``max_tokens`` is 16 for completions and "up to the context" for chat;
``temperature`` 1. The response shapes (``text_completion``, ``chat.completion``,
``chat.completion.chunk``, ``usage``, ``{"error": {...}}``) are OpenAI's, so its clients parse them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lorakit.errors import LorakitError
from lorakit.serve.logprobs import MAX_LOGPROBS, TokenStrings, chat_logprobs, completion_logprobs
from lorakit.serve.requests import Completion
from lorakit.serve.sampling import SamplingParams

MAX_CHOICES = 128  # prompts × n in one request (OpenAI's largest n)


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests --------------------------------------------------------------------------------------

class StrictBody(BaseModel):
    """A request body: strictly typed, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictBody):
    include_usage: bool = False


class _Generation(StrictBody):
    """The fields both endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_tokens: int = Field(0, ge=0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI accepts null for its optional parameters, and some clients send them so.
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        try:
            return SamplingParams(
                max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
                top_p=self.top_p, top_k=self.top_k, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                seed=self.seed, ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output, **self._logprob_params())
        except LorakitError as err:  # cross-field checks (min_tokens > max_tokens, empty stop strings)
            raise APIError(400, str(err), param=str(err).split()[0]) from None

    def _logprob_params(self) -> dict[str, int | None]:
        return {}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Generation):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def engine_prompts(self) -> list[dict[str, Any]]:
        """The keyword ``Engine.submit`` takes for each prompt, in order."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [{"prompt": prompt}]
        if not prompt:
            raise APIError(400, "prompt: an empty list; give a string, token ids, or a list of either", param="prompt")
        if isinstance(prompt[0], str):
            return [{"prompt": p} for p in prompt]
        if isinstance(prompt[0], list):
            return [{"prompt_ids": p} for p in prompt]
        return [{"prompt_ids": prompt}]

    def _logprob_params(self) -> dict[str, int | None]:
        echoed = self.logprobs if self.echo else None  # echo + logprobs: the prompt's logprobs too
        return {"logprobs": self.logprobs, "prompt_logprobs": echoed}


class TextPart(StrictBody):
    type: Literal["text"]
    text: str


class ChatMessage(StrictBody):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def plain(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(_Generation):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def sampling(self, default_max_tokens: int | None) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, f"top_logprobs={self.top_logprobs} needs logprobs: true", param="top_logprobs")
        return super().sampling(self.max_completion_tokens or default_max_tokens)  # max_tokens, if given, wins

    def _logprob_params(self) -> dict[str, int | None]:
        return {"logprobs": (self.top_logprobs or 0) if self.logprobs else None}

    def engine_prompts(self) -> list[dict[str, Any]]:
        return [{"messages": [m.plain() for m in self.messages]}]


class LoadAdapterRequest(StrictBody):
    """``POST /v1/load_lora_adapter`` (vLLM's body)."""

    lora_name: str
    lora_path: str


class UnloadAdapterRequest(StrictBody):
    """``POST /v1/unload_lora_adapter``."""

    lora_name: str


# Accepted for compatibility only at these values (OpenAI's defaults); anything else is refused by name.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "best_of": ((1, None), "best_of is not supported; use n"),
    "suffix": ((None,), "suffix (insertion) is not supported"),
    "presence_penalty": ((0, 0.0, None), "presence_penalty is not supported; leave it at 0"),
    "frequency_penalty": ((0, 0.0, None), "frequency_penalty is not supported; leave it at 0"),
    "logit_bias": ((None,), "logit_bias is not supported"),
    "tools": ((None,), "tool calling is not supported by this server"),
    "tool_choice": ((None, "none"), "tool calling is not supported by this server"),
    "functions": ((None,), "function calling is not supported by this server"),
    "response_format": ((None, {"type": "text"}), "response_format (JSON mode) is not supported"),
}

# What a field holds, for fields whose type is a union (pydantic's messages there name one branch).
_EXPECTED = {
    "prompt": "a string, a list of strings, a list of token ids, or a list of token id lists",
    "stop": "a string or a list of strings",
    "content": "a string or a list of {\"type\": \"text\", \"text\": ...} parts",
}


def parse_request(raw: bytes, kind: type[StrictBody]) -> Any:
    """Parse and validate a request body as ``kind``.

    Raises:
        APIError: 400 for malformed JSON, a wrong or unknown field, or an unsupported parameter;
            the message and ``param`` name the field.
    """
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    unsupported = _UNSUPPORTED.items() if issubclass(kind, _Generation) else ()
    for param, (allowed, message) in unsupported:
        if param in data and not any(data[param] == a and type(data[param]) is type(a) for a in allowed):
            raise APIError(400, f"{param}={json.dumps(data[param])}: {message}", param=param)
    try:
        return kind.model_validate_json(raw)
    except ValidationError as err:
        raise _validation_error(err) from None


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {'.'.join(loc)}", param=loc[0])
    if first["type"] == "missing":
        return APIError(400, f"missing required argument: {'.'.join(loc)}", param=loc[0])
    field = next((p for p in reversed(loc) if p in _EXPECTED), None)
    if field is not None:
        path = ".".join(loc[: loc.index(field) + 1])
        return APIError(400, f"{path}: expected {_EXPECTED[field]}", param=loc[0])
    got = f" (got {json.dumps(first['input'])})" if "input" in first and _short(first["input"]) else ""
    return APIError(400, f"{'.'.join(loc) or 'body'}: {first['msg']}{got}", param=loc[0] if loc else None)


def _short(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) and len(str(value)) <= 80


# -- responses -------------------------------------------------------------------------------------

def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, completion: Completion, strings: TokenStrings, echo: str | None,
                      with_logprobs: bool) -> dict[str, Any]:
    """One ``text_completion`` choice; ``echo`` is the prompt's text when the request echoes it."""
    logprobs = None
    if with_logprobs:
        tokens, entries = list(completion.token_ids), list(completion.logprobs or [])
        if echo is not None:
            tokens = completion.prompt_token_ids + tokens
            entries = list(completion.prompt_logprobs or [None] * len(completion.prompt_token_ids)) + entries
        logprobs = completion_logprobs(tokens, entries, strings)
    return {"index": index, "text": (echo or "") + completion.text, "logprobs": logprobs,
            "finish_reason": completion.finish_reason}


def chat_choice(index: int, completion: Completion, strings: TokenStrings, with_logprobs: bool) -> dict[str, Any]:
    """One ``chat.completion`` choice."""
    logprobs = chat_logprobs(completion.logprobs or [], strings) if with_logprobs else None
    return {"index": index, "message": {"role": "assistant", "content": completion.text},
            "logprobs": logprobs, "finish_reason": completion.finish_reason}


def body(chat: bool, request_id: str, created: int, model: str, choices: list[dict[str, Any]],
         counts: dict[str, int]) -> dict[str, Any]:
    """A whole (non-streamed) answer."""
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": counts}


def chunk(chat: bool, request_id: str, created: int, model: str, text: str | None,
          finish_reason: str | None = None, role: bool = False, with_usage: bool = False, index: int = 0,
          logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """One stream chunk; ``text=None`` with ``finish_reason`` is the closing chunk of a chat stream."""
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
    out = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": created, "model": model, "choices": [choice]}
    if with_usage:  # OpenAI: with include_usage every chunk carries "usage": null but the last
        out["usage"] = None
    return out


def usage_chunk(chat: bool, request_id: str, created: int, model: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": counts}


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line (``data: …`` and a blank line)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
