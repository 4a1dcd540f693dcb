"""The OpenAI-compatible HTTP server over an :class:`~lorakit.serve.engine.Engine` (FastAPI + uvicorn).

::

    client ──HTTP──► event loop: auth, parse, 404/429 ──► Engine.submit (worker thread: tokenize)
                        ▲                                        │ engine thread: batched steps
                        └── asyncio.Queue ◄── call_soon_threadsafe ── TokenEvent (on_event)

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (``stream``
as server-sent events ending in ``data: [DONE]``; several prompts, ``n``, ``logprobs``, ``echo``),
``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter`` (vLLM's bodies), vLLM's
``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``
(:mod:`lorakit.serve.tokenization`), ``GET /health``, ``GET /metrics``, and the page at ``GET /``
with its compare endpoints (:mod:`lorakit.serve.page`). A request's ``model`` names an adapter;
the base model's name means no adapter. Each choice of a request is one engine request;
:mod:`lorakit.serve.jobs` bridges their events to the event loop and builds the answer.

Notable:

- The event loop never blocks: tokenizing runs in a worker thread, generation in the engine's
  thread, and each request's events reach the loop through ``loop.call_soon_threadsafe``.
- A client that disconnects — mid-stream or while waiting for a whole completion — cancels its
  request, so its batch row is free at the engine's next step.
- Bounded: at most ``max_batch + max_queue`` generations are in flight; one more is answered 429
  at once instead of queueing without end. Bodies over ``max_body_bytes`` are answered 413.
- Errors are OpenAI's shape (:class:`~lorakit.serve.protocol.APIError`), and a bad request fails
  alone: it is refused before it joins the engine's queue, whose prefill batches requests together.
- Request and response shapes live in :mod:`lorakit.serve.protocol`, the counters in
  :mod:`lorakit.serve.metrics`, the body limit and the in-thread server in :mod:`lorakit.serve.asgi`.
- Security: the CLI binds 127.0.0.1 unless told otherwise; with an API key, ``/v1/*`` needs
  ``Authorization: Bearer KEY`` (``/health``, ``/metrics`` and the page's static files stay open). Runtime
  loading is off unless an adapter root is given, and then loads only safetensors adapters whose
  real path (symlinks resolved) lies inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorakit.adapters.config import CONFIG_NAME
from lorakit.adapters.peft_format import PICKLE_WEIGHTS_NAME, WEIGHTS_NAME
from lorakit.errors import LorakitError
from lorakit.inject import check_adapter_name
from lorakit.serve import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_QUEUE
from lorakit.serve.asgi import BodyLimit, CountResponses
from lorakit.serve.engine import ContextLengthExceededError, Engine
from lorakit.serve.metrics import Metrics
from lorakit.serve.jobs import Job
from lorakit.serve.logprobs import TokenStrings
from lorakit.serve.openapi import describe_bodies
from lorakit.serve.page import add_page
from lorakit.serve.protocol import (MAX_CHOICES, APIError, ChatRequest, CompletionRequest, LoadAdapterRequest,
                                    UnloadAdapterRequest, parse_request)
from lorakit.serve.registry import AdapterNotFoundError
from lorakit.serve.sampling import SamplingParams
from lorakit.serve.tokenization import add_tokenizer_routes

log = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat: up to the context


def create_app(engine: Engine, model_name: str, *, api_key: str | None = None, adapter_root: str | Path | None = None,
               data_root: str | Path | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app serving ``engine``; it starts the engine's thread on startup (and stops it on
    shutdown if it started it).

    Args:
        engine: the engine, with its adapters loaded.
        model_name: the base model's name in ``/v1/models`` and in requests.
        api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        adapter_root: the folder ``/v1/load_lora_adapter`` may load from; None turns runtime
            loading and unloading off.
        data_root: a folder whose data files the page's compare view may read (as it may those
            under ``adapter_root``); uploads work without one.
        max_queue: generations waiting beyond the engine's ``max_batch`` before answering 429.
        max_body_bytes: the largest request body (413 above it).

    Raises:
        LorakitError: an adapter or data root that is not a folder, or a bad limit.
    """
    if max_body_bytes < 1:
        raise LorakitError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    server = _Server(engine, model_name, api_key, adapter_root, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        started = not engine.running_in_background
        engine.start()
        yield
        if started:
            engine.stop()

    app = FastAPI(title="lorakit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = server
    auth = [Depends(server.authorize)]
    app.add_api_route("/v1/models", server.models, methods=["GET"], dependencies=auth)
    app.add_api_route("/v1/completions", server.completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/chat/completions", server.chat_completions, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/load_lora_adapter", server.load_adapter, methods=["POST"], dependencies=auth)
    app.add_api_route("/v1/unload_lora_adapter", server.unload_adapter, methods=["POST"], dependencies=auth)
    add_tokenizer_routes(app, server)
    app.add_api_route("/health", server.health, methods=["GET"])
    app.add_api_route("/metrics", server.render_metrics, methods=["GET"])
    roots = {label: root for label, root in (("data", data_root), ("adapter", adapter_root)) if root is not None}
    add_page(app, engine, server.adapter_for, auth, data_roots=roots, max_upload_bytes=max_body_bytes)
    describe_bodies(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest,
                          "/v1/load_lora_adapter": LoadAdapterRequest, "/v1/unload_lora_adapter": UnloadAdapterRequest})
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(CountResponses, count=server.metrics.answered, routes={r.path for r in app.routes})
    return app


class _Server:
    """The routes' state and work: the engine, the served names, limits and counters."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, adapter_root: str | Path | None,
                 max_queue: int) -> None:
        if max_queue < 0:
            raise LorakitError(f"max_queue must be >= 0, got {max_queue}")
        if adapter_root is not None and not Path(adapter_root).is_dir():
            raise LorakitError(f"adapter root {adapter_root} is not a folder; create it or pass an existing one")
        self.engine, self.model_name, self.api_key = engine, model_name, api_key
        self.adapter_root = Path(os.path.realpath(adapter_root)) if adapter_root is not None else None
        self.capacity = engine.max_batch + max_queue
        self.in_flight = 0
        self.metrics = Metrics()
        self.created = int(time.time())
        self.strings = TokenStrings(engine.tokenizer)
        self._ids = itertools.count()

    # -- plumbing --------------------------------------------------------------------------------

    async def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers=challenge)
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key", headers=challenge)

    def adapter_for(self, model: str) -> str | None:
        if model == self.model_name:
            return None
        if model in self.engine.registry:
            return model
        served = ", ".join([self.model_name, *self.engine.registry.names()])
        raise APIError(404, f"the model {model!r} does not exist; served models: {served}",
                       param="model", code="model_not_found")

    # -- info routes -----------------------------------------------------------------------------

    async def models(self) -> dict[str, Any]:
        def card(name: str, root: str, parent: str | None) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": self.created, "owned_by": "lorakit",
                    "root": root, "parent": parent, "max_model_len": self.engine.max_context}

        cards = [card(self.model_name, self.model_name, None)]
        cards += [card(info.name, info.path, self.model_name) for info in self.engine.adapters()]
        return {"object": "list", "data": cards}

    async def health(self) -> Response:
        if self.engine.running_in_background:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "engine not running"}, status_code=503)

    async def render_metrics(self) -> PlainTextResponse:
        stats = self.engine.stats()
        text = self.metrics.render(stats["running"], stats["waiting"], len(self.engine.registry.names()),
                                   len(stats["resident"]), stats["prefix_cache"])
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- generation ------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, CompletionRequest)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, ChatRequest)

    async def _generate(self, request: Request, kind: type[CompletionRequest] | type[ChatRequest]) -> Response:
        body = parse_request(await request.body(), kind)
        chat = kind is ChatRequest
        adapter = self.adapter_for(body.model)
        params = body.sampling(None if chat else COMPLETION_DEFAULT_MAX_TOKENS)
        prompts = body.engine_prompts()
        count = len(prompts) * body.n
        if count > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts × n={body.n} is {count} choices; at most {MAX_CHOICES} in "
                           "one request", param="n")
        if self.in_flight + count > self.capacity:
            raise APIError(429, f"the server is busy: {self.in_flight} requests in flight, the most it takes "
                           "(max_batch + max_queue); retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"})
        echo = not chat and body.echo
        texts = [self._prompt_text(p) if echo else None for p in prompts]
        echoes = [text for text in texts for _ in range(body.n)]
        job = Job(self, body.model, chat, f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}", body.n, echoes,
                  params.logprobs is not None, self.strings)
        try:
            await asyncio.to_thread(self._submit, job, prompts, adapter, params)
        except LorakitError as err:
            job.close()
            raise _submit_error(err, "messages" if chat else "prompt") from None
        except BaseException:
            job.close()
            raise
        job.watch(request)
        if body.stream:
            first = await job.next()
            if first is None or (first[1].finished and first[1].finish_reason == "error"):
                job.close()
                return _finished_badly(job, first is not None)
            return StreamingResponse(job.stream(first, body.include_usage, lambda: _failure(job)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(job.aclose))
        try:
            failed = await job.wait()
            gone = job.closed
        finally:
            job.close()
        if gone or failed is not None:
            return _finished_badly(job, not gone)
        return JSONResponse(job.answer())

    def _submit(self, job: Job, prompts: list[dict[str, Any]], adapter: str | None, params: SamplingParams) -> None:
        """Submit every choice (a worker thread: tokenizing); on a bad prompt cancel the ones submitted."""
        try:
            for i, prompt in enumerate(prompts):
                for j in range(job.n):
                    seeded = replace(params, seed=params.seed + j) if params.seed is not None and j else params
                    index = i * job.n + j
                    job.handles.append(self.engine.submit(**prompt, adapter=adapter, params=seeded,
                                                          on_event=job.listener(index), request_id=f"{job.id}-{index}"))
        except BaseException:
            for handle in job.handles:
                handle.cancel()
            raise

    def _prompt_text(self, prompt: dict[str, Any]) -> str:
        """The prompt as ``echo`` returns it: the string given, or the token ids decoded."""
        if "prompt" in prompt:
            return prompt["prompt"]
        return self.engine.tokenizer.decode(prompt["prompt_ids"], skip_special_tokens=False)

    # -- runtime adapters ------------------------------------------------------------------------

    async def load_adapter(self, request: Request) -> PlainTextResponse:
        body = parse_request(await request.body(), LoadAdapterRequest)
        name = self._new_adapter_name(body.lora_name)
        folder = self._allowed_folder(body.lora_path)
        try:
            await asyncio.to_thread(self.engine.load_adapter, name, folder)
        except LorakitError as err:
            raise APIError(400, str(err), param="lora_path") from None
        log.info("loaded adapter %s from %s", name, folder)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_adapter(self, request: Request) -> PlainTextResponse:
        body = parse_request(await request.body(), UnloadAdapterRequest)
        self._require_runtime_updates()
        try:
            self.engine.unload_adapter(body.lora_name)
        except AdapterNotFoundError as err:
            raise APIError(404, str(err), param="lora_name", code="model_not_found") from None
        log.info("unloaded adapter %s", body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def _require_runtime_updates(self) -> None:
        if self.adapter_root is None:
            raise APIError(403, "runtime adapter loading is off on this server; start it with --adapter-root DIR "
                           "to load and unload adapters from that folder", type="permission_error")

    def _new_adapter_name(self, name: str) -> str:
        self._require_runtime_updates()
        try:
            check_adapter_name(name)
        except LorakitError as err:
            raise APIError(400, str(err), param="lora_name") from None
        if name == self.model_name or name in self.engine.registry:
            raise APIError(400, f"the name {name!r} is already served; unload it first or choose another",
                           param="lora_name")
        return name

    def _allowed_folder(self, lora_path: str) -> Path:
        """``lora_path`` (absolute, or relative to the root) resolved, if it is an adapter inside the root."""
        root = self.adapter_root
        given = Path(lora_path)
        if ".." in given.parts:
            raise APIError(403, "lora_path must not contain '..'", param="lora_path", type="permission_error")
        folder = Path(os.path.realpath(given if given.is_absolute() else root / given))
        if not folder.is_relative_to(root):
            raise APIError(403, f"lora_path {lora_path!r} is outside the adapter root (symlinks resolved); only "
                           "folders under the server's --adapter-root are loaded", param="lora_path",
                           type="permission_error")
        if not folder.is_dir():
            raise APIError(400, f"lora_path {lora_path!r} is not a folder", param="lora_path")
        weights = folder / WEIGHTS_NAME
        if not weights.is_file() and (folder / PICKLE_WEIGHTS_NAME).exists():
            raise APIError(400, f"lora_path {lora_path!r} holds {PICKLE_WEIGHTS_NAME}, a pickle file, which the "
                           "server never loads; convert the adapter to safetensors", param="lora_path")
        for path in (folder / CONFIG_NAME, weights):
            if not path.is_file():
                raise APIError(400, f"lora_path {lora_path!r} has no {path.name}; an adapter folder holds "
                               f"{CONFIG_NAME} and {WEIGHTS_NAME}", param="lora_path")
            if not Path(os.path.realpath(path)).is_relative_to(root):
                raise APIError(403, f"{path.name} in {lora_path!r} links outside the adapter root",
                               param="lora_path", type="permission_error")
        return folder


def _failure(job: Job) -> APIError:
    error = next((h.completion.error for h in job.handles if h.completion.error is not None), None)
    if isinstance(error, AdapterNotFoundError):  # unloaded between submit and admission
        return APIError(404, str(error), param="model", code="model_not_found")
    return APIError(500, f"generation failed: {error}", type="server_error")


def _finished_badly(job: Job, listening: bool) -> Response:
    if not listening:  # nobody is listening; 499 is nginx's "client closed request"
        return Response(status_code=499)
    error = _failure(job)
    return JSONResponse(error.body(), status_code=error.status)


def _submit_error(err: LorakitError, prompt_param: str) -> APIError:
    if isinstance(err, AdapterNotFoundError):
        return APIError(404, str(err), param="model", code="model_not_found")
    if isinstance(err, ContextLengthExceededError):
        return APIError(400, str(err), param=prompt_param, code="context_length_exceeded")
    return APIError(400, str(err), param=prompt_param)


# -- error handlers ----------------------------------------------------------------------------------

async def _api_error(request: Request, err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    body = APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}").body()
    return JSONResponse(body, status_code=err.status_code, headers=getattr(err, "headers", None))


async def _internal_error(request: Request, err: Exception) -> JSONResponse:
    log.exception("internal error on %s %s", request.method, request.url.path)
    body = APIError(500, f"internal server error ({type(err).__name__}); see the server log", type="server_error")
    return JSONResponse(body.body(), status_code=500)
