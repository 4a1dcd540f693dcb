"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

Clients that count tokens or send token ids use them to tokenize exactly as the server does
(lm-evaluation-harness probes ``/tokenizer_info`` and ``/tokenize`` and, when both answer, uses them
as its tokenizer). The bodies are vLLM's:

- ``/tokenize``: ``{"prompt": str, "add_special_tokens": true}`` or ``{"messages": [...],
  "add_generation_prompt": true, "add_special_tokens": false}`` (through the chat template, as
  ``/v1/chat/completions`` does), optional ``model`` and ``return_token_strs`` →
  ``{"count", "max_model_len", "tokens", "token_strs"}``;
- ``/detokenize``: ``{"tokens": [ids]}`` → ``{"prompt": str}`` (special tokens kept);
- ``/tokenizer_info``: the tokenizer's class, special tokens, chat template and ``model_max_length``.

Tokens come from :func:`lorakit.serve.prompts.tokenize_prompt`, the function the engine uses for
requests, so both agree token for token. As in vLLM, the routes sit outside ``/v1`` and need no key.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from lorakit.errors import LorakitError
from lorakit.serve.protocol import APIError, ChatMessage, StrictBody, parse_request
from lorakit.serve.prompts import tokenize_prompt

if TYPE_CHECKING:
    from lorakit.serve.http import _Server


class TokenizeRequest(StrictBody):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(StrictBody):
    model: str | None = None
    tokens: list[int]


def add_tokenizer_routes(app: FastAPI, server: _Server) -> None:
    """Add the three routes to ``app``, over ``server``'s engine and tokenizer."""
    engine = server.engine

    def check_model(model: str | None) -> None:
        if model is not None:
            server.adapter_for(model)  # 404 for a model not served; one tokenizer serves them all

    async def tokenize(request: Request) -> dict[str, Any]:
        body = parse_request(await request.body(), TokenizeRequest)
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        messages = None if body.messages is None else [m.plain() for m in body.messages]
        try:
            ids = await asyncio.to_thread(
                tokenize_prompt, engine.tokenizer, engine.vocab, prompt=body.prompt, messages=messages,
                add_special_tokens=body.add_special_tokens, add_generation_prompt=body.add_generation_prompt,
                allow_empty=True)
        except LorakitError as err:
            raise APIError(400, str(err), param="messages" if messages is not None else "prompt") from None
        strs = [server.strings(t) for t in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": engine.max_context, "tokens": ids, "token_strs": strs}

    async def detokenize(request: Request) -> dict[str, Any]:
        body = parse_request(await request.body(), DetokenizeRequest)
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < engine.vocab]
        if bad:
            raise APIError(400, f"tokens must lie in [0, {engine.vocab}) for this model; got {bad[:5]}",
                           param="tokens")
        text = await asyncio.to_thread(engine.tokenizer.decode, body.tokens, skip_special_tokens=False)
        return {"prompt": text}

    async def tokenizer_info() -> dict[str, Any]:
        tok = engine.tokenizer
        info: dict[str, Any] = {"tokenizer_class": type(tok).__name__, "model_max_length": engine.max_context}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = value if isinstance(value, str) or value is None else str(value)
        info["chat_template"] = getattr(tok, "chat_template", None)
        return info

    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
