"""The multi-adapter inference engine: one base model, many LoRA adapters, one continuous batch.

::

    submit() ──► waiting (FIFO) ──► admit: pin adapter slot ──► prefill (newcomers together)
                                                                   │ first token
    step():  decode every running row (one forward, one token each) ◄── join the running batch
             └─► sample per row ──► stream text ──► finished rows leave (slot unpinned)

Each step is one decode forward of every running request, then one prefill forward of the
requests admitted at this step; in both, every row may use a different adapter (or none): the
base matmuls run once for the batch and the low-rank parts are grouped by adapter
(:mod:`lorakit.serve.layers`). The KV cache is one left-padded batch cache (:mod:`lorakit.serve.kv`).

Use it synchronously (iterating a handle or calling ``result()`` drives the engine in the
caller's thread) or with a background thread (:meth:`Engine.start`), which is what the HTTP
server does. All public methods are thread-safe.

DoRA adapters are served per row like plain LoRA: each DoRA row's output is scaled by its
adapter's per-feature ``c = m / ‖W + s·B A‖_row``, computed once when the adapter is loaded.
Adapters of the output head and the input embeddings are served too (every layer an adapter
changes counts), so logprobs are those of the adapter's own distribution.

Prompts go through the prefix cache (:mod:`lorakit.serve.prefix_cache`): a prompt whose start was
computed before, for the same adapter, prefills only the rest (:mod:`lorakit.serve.prefill`). A
waiting prompt that shares a long uncached start with one admitted at this step waits one step, so
that start is computed once (the choices of a multiple-choice question, a common system prompt).
Logprobs (:mod:`lorakit.serve.logprobs`): ``SamplingParams.logprobs`` for generated tokens,
``prompt_logprobs`` for the prompt's (computed in the same batched prefill as everything else).

Mixture-of-experts models: adapters with LoRA on the experts (PEFT's ``target_parameters``) are
served per row too — the routed base computation once, each adapter's rank-r terms on its rows'
(token, expert) pairs (:mod:`lorakit.serve.experts`).

Not served (refused with a message when loading): ``lora_bias``, ``modules_to_save``, DoRA on an
embedding. Merge those into the base with ``lorakit merge``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from lorakit.errors import LorakitError
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import DEFAULT_PREFIX_CACHE_BYTES
from lorakit.serve.head import OutputHead
from lorakit.serve.kv import BatchCache
from lorakit.serve.logprobs import TokenLogprob, pick
from lorakit.serve.prefill import Prefiller, PrefillRow
from lorakit.serve.prefix_cache import PrefixCache
from lorakit.serve.prompts import eos_ids, model_context, tokenize_prompt
from lorakit.serve.registry import AdapterInfo, AdapterNotFoundError, AdapterRegistry
from lorakit.serve.requests import Completion, RequestHandle, TokenEvent
from lorakit.serve.sampling import SamplingParams, sample
from lorakit.serve.scheduling import Admission, Request
from lorakit.serve.text import TextStream

log = logging.getLogger(__name__)



class ContextLengthExceededError(LorakitError):
    """A prompt (plus its max_tokens) does not fit the context (HTTP: 400 context_length_exceeded)."""

    code = "context_length_exceeded"


class Engine:
    """Batched multi-adapter generation over one base model.

    Args:
        model: a transformers causal LM (changed in place: its target modules become batched
            LoRA layers; with no adapter in a batch it computes exactly as before).
        tokenizer: its tokenizer (chat template for ``messages``).
        max_batch: running requests at most (more wait).
        max_resident: adapters resident at once (slots per layer); more are loaded on demand,
            evicting the least recently used.
        max_rank: the largest adapter rank accepted (slots are this wide).
        target_modules: modules that can carry adapters (``all-linear``, names or a regex).
        target_parameters: 2-D parameters (routers) that can carry adapters, as PEFT's
            ``target_parameters`` (default: those PEFT's MoE rule derives from ``target_modules``);
            the experts of an MoE model can always carry them.
        max_context: the context length enforced per request (default: the model's).
        max_prefill_tokens: padded prompt tokens prefilled in one step at most (at least one
            request is always admitted).
        strategy: ``grouped`` (default) or ``gather``; see :mod:`lorakit.serve.layers`.
        prefix_cache_bytes: memory for cached prompt prefixes (0 turns the prefix cache off).
    """
    def __init__(self, model: nn.Module, tokenizer: Any, *, max_batch: int = 32, max_resident: int = 8,
                 max_rank: int = 16, target_modules: list[str] | str = "all-linear",
                 max_context: int | None = None, max_prefill_tokens: int = 8192,
                 strategy: str = "grouped", prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
                 target_parameters: list[str] | None = None) -> None:
        if strategy not in ("grouped", "gather"):
            raise LorakitError(f"strategy must be 'grouped' or 'gather', got {strategy!r}")
        if max_batch < 1:
            raise LorakitError(f"max_batch must be >= 1, got {max_batch}")
        if max_context is not None and max_context < 1:
            raise LorakitError(f"max_context must be >= 1 (or None for the model's), got {max_context}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.registry = AdapterRegistry(model, max_resident=max_resident, max_rank=max_rank,
                                        target_modules=target_modules, target_parameters=target_parameters)
        self.device = next(model.parameters()).device
        self.vocab = model.get_input_embeddings().num_embeddings
        self.max_batch, self.max_prefill_tokens, self.strategy = max_batch, max_prefill_tokens, strategy
        self.max_context = max_context or model_context(model)
        self.eos_ids = eos_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.head = OutputHead.split(model)  # None: the model runs whole, no prompt logprobs
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._prefiller = Prefiller(model, self.registry, self.head, self.prefix_cache, self.pad_id, self.device,
                                    strategy)
        self._admission = Admission(self.registry, self.prefix_cache, max_batch, max_prefill_tokens)
        self._stale_versions: list[int] = []  # adapter versions unloaded or replaced: their prefixes go
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._batch: BatchCache | None = None
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    @classmethod
    def from_pretrained(cls, base: str, adapters: dict[str, str | Path] | None = None,
                        dtype: torch.dtype | str | None = None, device: str | None = None, **kwargs: Any) -> Engine:
        """An engine over base model ``base`` (any spec :func:`lorakit.models.resolve` takes) with
        ``adapters`` (name → PEFT folder) loaded; ``kwargs`` go to :class:`Engine`."""

        engine = cls(load_model(base, dtype=dtype, device=device), load_tokenizer(base), **kwargs)
        for name, folder in (adapters or {}).items():
            engine.load_adapter(name, folder)
        return engine

    # -- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name: str, folder: str | Path, replace: bool = False) -> AdapterInfo:
        """Register the PEFT adapter in ``folder`` as ``name``; usable at once, by running engines too.

        Raises:
            LorakitError: the folder is not a servable adapter for this model (the message says why).
        """
        stale = self.registry.version(name) if replace and name in self.registry else None
        info = self.registry.add(name, folder, replace=replace)
        if stale is not None:
            self._forget_prefixes(stale)
        return info

    def unload_adapter(self, name: str) -> None:
        """Forget adapter ``name``: new requests for it fail; running ones finish with it.

        Raises:
            AdapterNotFoundError: no adapter of that name.
        """
        version = self.registry.version(name)
        self.registry.remove(name)
        self._forget_prefixes(version)

    def _forget_prefixes(self, version: int) -> None:
        with self._lock:  # the cache belongs to the engine's loop: it drops them at its next step
            self._stale_versions.append(version)

    def adapters(self) -> list[AdapterInfo]:
        """Every known adapter (``resident`` says whether it holds a slot now)."""
        infos = []
        for name in self.registry.names():
            try:
                infos.append(self.registry.info(name))
            except AdapterNotFoundError:  # unloaded meanwhile
                pass
        return infos

    @contextlib.contextmanager
    def exclusive(self, adapter: str | None, rows: int) -> Iterator[nn.Module]:
        """The engine's model between two steps, computing as ``adapter`` (None: the base) for
        batches of ``rows`` rows: for forwards outside the generation batch (the page's answer-token
        loss). No step runs meanwhile, so hold it for one forward at a time.

        Raises:
            AdapterNotFoundError: ``adapter`` is not loaded.
            AdapterSlotsBusyError: it is not resident and running requests pin every slot.
        """
        with self._step_lock, torch.inference_mode():
            slot = self.registry.acquire(adapter)
            try:
                with self.registry.context.using(self._prefiller.plan([slot] * rows)):
                    yield self.model
            finally:
                self.registry.release(slot)

    # -- requests ------------------------------------------------------------------------------

    def submit(self, prompt: str | None = None, *, messages: list[dict] | None = None,
               prompt_ids: list[int] | None = None, adapter: str | None = None,
               params: SamplingParams | None = None, on_event: Callable[[TokenEvent], None] | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue one request; give exactly one of ``prompt``, ``messages`` or ``prompt_ids``.

        Args:
            prompt: text, tokenized as is (the tokenizer's special tokens added).
            messages: chat messages (``[{"role": "user", "content": …}]``), formatted with the
                tokenizer's chat template and the generation prompt.
            prompt_ids: token ids.
            adapter: the adapter's name, or None for the base model.
            params: sampling parameters (default :class:`SamplingParams`).
            on_event: called with each :class:`TokenEvent`, on the engine's thread.
            request_id: an id for logs and events (default: generated).

        Returns:
            The request's handle.

        Raises:
            AdapterNotFoundError: ``adapter`` is not loaded.
            ContextLengthExceededError: the prompt, or prompt + max_tokens, exceeds the context.
            LorakitError: no/several prompts given, an empty prompt, no chat template, prompt
                logprobs from a model whose logits are not its head over its last hidden state.
        """
        params = params or SamplingParams()
        if params.prompt_logprobs is not None and self.head is None:
            raise LorakitError("prompt logprobs (echo with logprobs) are not available for this model: its logits "
                               "are not its output head applied to its last hidden state (lorakit.serve.head)")
        ids = tokenize_prompt(self.tokenizer, self.vocab, prompt, messages, prompt_ids)
        if adapter is not None and adapter not in self.registry:
            raise AdapterNotFoundError(
                f"no adapter named {adapter!r} (loaded: {', '.join(self.registry.names()) or 'none'})")
        room = self.max_context - len(ids)
        if room < 1 or (params.max_tokens is not None and params.max_tokens > room):
            wanted = len(ids) + (params.max_tokens or 1)
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_context} tokens; the request needs "
                f"{wanted} ({len(ids)} in the prompt, {params.max_tokens or 1} to generate); shorten "
                "the prompt or lower max_tokens")
        request_id = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(self, request_id, adapter, ids, on_event)
        stream = TextStream(self.tokenizer, params, self.eos_ids, params.max_tokens or room)
        request = Request(handle, ids, params, stream, self.device)
        with self._lock:
            self._waiting.append(request)
            self._lock.notify_all()
        return handle

    def generate(self, prompts: list[str] | None = None, *, messages: list[list[dict]] | None = None,
                 adapters: list[str | None] | str | None = None,
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[Completion]:
        """Submit several requests at once and wait for them all (a convenience over :meth:`submit`).

        ``adapters`` is one name for all or one per request; ``params`` likewise.
        """
        items = [dict(prompt=p) for p in prompts] if prompts is not None else [dict(messages=m) for m in messages or []]
        names = adapters if isinstance(adapters, list) else [adapters] * len(items)
        plist = params if isinstance(params, list) else [params] * len(items)
        if len(names) != len(items) or len(plist) != len(items):
            raise LorakitError(f"{len(items)} prompts but {len(names)} adapters and {len(plist)} params")
        handles = [self.submit(**item, adapter=a, params=p) for item, a, p in zip(items, names, plist)]
        return [h.result() for h in handles]

    # -- the loop ------------------------------------------------------------------------------

    @property
    def running_in_background(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._running)

    def stats(self) -> dict[str, Any]:
        """Running and waiting requests, the cache length and the resident adapters."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting),
                    "cache_length": self._batch.length if self._batch else 0,
                    "resident": self.registry.resident(), "prefix_cache": self.prefix_cache.stats()}

    def start(self) -> Engine:
        """Run the engine loop in a background thread (idempotent). Returns the engine."""
        if self.running_in_background:
            return self
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread after its current step; unfinished requests are cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock:
            for request in list(self._running) + list(self._waiting):
                request.handle.cancel()
            self._drop_cancelled()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wake(self) -> None:
        """Wake the background loop to look at its requests again (a request was cancelled)."""
        with self._lock:
            self._lock.notify_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not (self._waiting or self._running):
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as err:  # a bug must not leave callers waiting forever
                log.exception("engine loop failed; failing every request")
                with self._step_lock:
                    self._fail_running(err)
                    with self._lock:
                        waiting, self._waiting = list(self._waiting), deque()
                    for request in waiting:
                        self._finish(request, "error", err)

    def step(self) -> bool:
        """One engine step: a decode forward of the running requests, then a prefill of newcomers.

        Returns:
            Whether requests remain (running or waiting).
        """
        with self._step_lock, torch.inference_mode():
            with self._lock:
                stale, self._stale_versions = self._stale_versions, []
            for version in stale:
                self.prefix_cache.drop(version)
            self._drop_cancelled()
            if self._running:
                try:
                    self._decode()
                except Exception as err:  # a model failure fails its batch, not the engine
                    log.exception("decode step failed; failing the running requests")
                    self._fail_running(err)
            self._admit_and_prefill()
        return self.has_work()

    def _decode(self) -> None:
        rows = self._running
        mask, positions = self._batch.step_inputs()
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)
        logits = self._forward(ids, mask, positions, self._batch.cache, [r.slot for r in rows])
        self._batch.advance(mask)
        tokens, logprobs = self._sample(logits, rows)
        finished = [self._emit(r, t, lp) for r, t, lp in zip(rows, tokens, logprobs)]
        self._retire([i for i, done in enumerate(finished) if not done])

    def _admit_and_prefill(self) -> None:
        with self._lock:
            admitted = self._admission.admit(self._waiting, len(self._running), self._finish)
        if not admitted:
            return
        rows = [PrefillRow(r.prompt_ids, r.slot, r.key, r.params.prompt_logprobs, r.match) for r in admitted]
        for r in admitted:
            r.match = None
        try:
            result = self._prefiller.run(rows)
            tokens, logprobs = self._sample(result.logits, admitted)
        except Exception as err:  # fails the newcomers only; the running batch is untouched
            log.exception("prefill failed; failing the %d requests it admitted", len(admitted))
            for r in admitted:
                self._finish(r, "error", err)
                self.registry.release(r.slot)
            return
        new = result.batch
        for r, prompt_logprobs in zip(admitted, result.prompt_logprobs):
            r.completion.prompt_logprobs = prompt_logprobs
        finished = [self._emit(r, t, lp) for r, t, lp in zip(admitted, tokens, logprobs)]
        for r, done in zip(admitted, finished):
            if done:
                if r.completion.finish_reason is None:
                    self._finish(r, "cancelled")
                self.registry.release(r.slot)
        keep = [i for i, done in enumerate(finished) if not done]
        if not keep:
            return
        new.select(keep)
        with self._lock:
            if self._batch is None:
                self._batch = new
            else:
                self._batch.join(new)
            self._running.extend(admitted[i] for i in keep)

    def _sample(self, logits: torch.Tensor, rows: list[Request]) -> tuple[list[int], list[TokenLogprob | None]]:
        """Each row's next token, and its logprob where the request asked (from the raw logits)."""
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        raw = logits[want].float() if want else None  # a copy, before min_tokens masks it
        for i, r in enumerate(rows):  # min_tokens: no stop token yet
            if len(r.tokens) < r.params.min_tokens and r.stream.stop_ids:
                logits[i, sorted(r.stream.stop_ids)] = float("-inf")
        tokens = sample(logits, [r.params for r in rows], [r.generator for r in rows])
        logprobs: list[TokenLogprob | None] = [None] * len(rows)
        if want:
            k = max(rows[i].params.logprobs for i in want)
            picked = pick(raw, torch.tensor([tokens[i] for i in want], device=raw.device), k)
            for i, entry in zip(want, picked):
                logprobs[i] = TokenLogprob(entry.token, entry.logprob, entry.top[:rows[i].params.logprobs])
        return tokens, logprobs

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: DynamicCache,
                 slots: list[int]) -> torch.Tensor:
        """Last-position logits (B, V) of one forward in which row ``i`` uses adapter slot ``slots[i]``."""
        with self.registry.context.using(self._prefiller.plan(slots)):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    # -- tokens, text, finishing ---------------------------------------------------------------

    def _emit(self, request: Request, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Record ``token`` for ``request``, stream what became final; True when it finished."""
        request.tokens.append(token)
        stream = request.stream
        delta = stream.push(request.tokens)
        completion = request.completion
        completion.token_ids = list(request.tokens)
        completion.text = stream.text
        completion.finish_reason = stream.finish_reason
        if logprob is not None:
            if completion.logprobs is None:
                completion.logprobs = []
            completion.logprobs.append(logprob)
        event = TokenEvent(request.handle.request_id, delta, token, len(request.tokens),
                           finished=stream.finish_reason is not None, finish_reason=stream.finish_reason,
                           logprob=logprob)
        self._publish(request, event)
        return event.finished or request.handle.cancelled

    def _publish(self, request: Request, event: TokenEvent) -> None:
        try:
            request.handle.publish(event)
        except Exception:  # a failing callback cancels its own request, nothing else
            log.exception("on_event callback of request %s failed; cancelling it", request.handle.request_id)
            request.handle.mark_cancelled()
            if not event.finished:
                self._finish(request, "cancelled")

    def _finish(self, request: Request, reason: str, error: Exception | None = None) -> None:
        completion = request.completion
        if completion.finish_reason is not None:
            return
        completion.finish_reason = reason
        if error is not None:
            completion.error = error if isinstance(error, LorakitError) else LorakitError(
                f"request {request.handle.request_id} failed: {type(error).__name__}: {error}")
            completion.error.__cause__ = error if completion.error is not error else None
        event = TokenEvent(request.handle.request_id, "", None, len(request.tokens), True, reason)
        try:
            request.handle.publish(event)
        except Exception:
            log.exception("on_event callback of request %s failed", request.handle.request_id)

    def _retire(self, keep: list[int]) -> None:
        """Drop running rows not in ``keep`` (finished or cancelled) and unpin their slots."""
        if len(keep) == len(self._running):
            return
        kept = set(keep)
        for i, request in enumerate(self._running):
            if i not in kept:
                if request.completion.finish_reason is None:
                    self._finish(request, "cancelled")
                self.registry.release(request.slot)
        with self._lock:
            self._running = [self._running[i] for i in keep]
            if keep:
                self._batch.select(keep)
            else:
                self._batch = None

    def _drop_cancelled(self) -> None:
        if any(r.handle.cancelled for r in self._running):
            self._retire([i for i, r in enumerate(self._running) if not r.handle.cancelled])
        with self._lock:
            waiting = [r for r in self._waiting if r.handle.cancelled]
            for request in waiting:
                self._waiting.remove(request)
                self._finish(request, "cancelled")

    def _fail_running(self, err: Exception) -> None:
        for request in self._running:
            self._finish(request, "error", err)
            self.registry.release(request.slot)
        with self._lock:
            self._running, self._batch = [], None

