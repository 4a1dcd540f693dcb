"""What a caller holds for one request: its handle (stream, result, cancel) and its events.

A :class:`RequestHandle` is returned by :meth:`Engine.submit`. Tokens arrive as
:class:`TokenEvent` objects, through the ``on_event`` callback (called on the engine's thread:
keep it short; an HTTP server hands each event to its event loop with
``loop.call_soon_threadsafe``) and through iteration over the handle. ``result()`` waits for the
:class:`Completion`. When the engine has no background thread (:meth:`Engine.start` not called),
iterating or waiting drives the engine in the caller's thread.

The handle and the engine talk through public methods only: the handle calls the engine's
:meth:`~Engine.step`, :attr:`~Engine.running_in_background` and :meth:`~Engine.wake` (a request was
cancelled); the engine calls the handle's :meth:`~RequestHandle.publish` (one event) and
:meth:`~RequestHandle.mark_cancelled` (the engine itself cancels the request).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError
from lorakit.serve.logprobs import TokenLogprob

if TYPE_CHECKING:
    from lorakit.serve.engine import Engine

FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class TokenEvent:
    """One step of one request's stream.

    Attributes:
        request_id: the request.
        text: the text that became final since the previous event (may be empty: text is held
            back while it could still turn into a stop string or an incomplete character).
        token_id: the token generated at this step (None for an event without a token,
            e.g. cancellation or an error).
        index: how many tokens the request has generated, this one included.
        finished: the last event of the request.
        finish_reason: ``stop`` (end-of-sequence, stop token or stop string), ``length``
            (max_tokens or the context limit), ``cancelled`` or ``error``; None until finished.
        logprob: the token's logprob and alternatives, when the request asked for ``logprobs``.
    """

    request_id: str
    text: str
    token_id: int | None
    index: int
    finished: bool = False
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None


@dataclass
class Completion:
    """A finished request.

    ``logprobs``: one entry per generated token, with ``SamplingParams.logprobs``;
    ``prompt_logprobs``: one per prompt token (the first is None), with ``prompt_logprobs``.
    """

    request_id: str
    adapter: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: LorakitError | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RequestHandle:
    """A submitted request: iterate for its :class:`TokenEvent` stream, ``result()``, ``cancel()``."""

    def __init__(self, engine: Engine, request_id: str, adapter: str | None, prompt_ids: list[int],
                 on_event: Callable[[TokenEvent], None] | None) -> None:
        self.request_id = request_id
        self.adapter = adapter
        self._engine = engine
        self._events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self._on_event = on_event
        self._done = threading.Event()
        self._cancel = threading.Event()
        self.completion = Completion(request_id, adapter, list(prompt_ids))

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Ask the engine to stop this request at its next step (finish reason ``cancelled``)."""
        self._cancel.set()
        self._engine.wake()

    def __iter__(self) -> Iterator[TokenEvent]:
        """The events as they come; raises the request's error, if it fails, after its last event."""
        while True:
            event = self._next_event()
            yield event
            if event.finished:
                if self.completion.error is not None:
                    raise self.completion.error
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the request to finish and return it.

        Raises:
            LorakitError: the request failed (unknown adapter, a model error…).
            TimeoutError: not finished within ``timeout`` seconds.
        """
        while not self._done.is_set():
            if self._engine.running_in_background:
                if not self._done.wait(timeout):
                    raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            else:
                self._engine.step()
        if self.completion.error is not None:
            raise self.completion.error
        return self.completion

    def _next_event(self) -> TokenEvent:
        while True:
            try:
                return self._events.get_nowait()
            except queue.Empty:
                pass
            if self._engine.running_in_background:
                try:
                    return self._events.get(timeout=0.5)
                except queue.Empty:
                    continue
            self._engine.step()

    # -- called by the engine ----------------------------------------------------------------

    def publish(self, event: TokenEvent) -> None:
        """Deliver one event (engine side): to the stream and to ``on_event``; the last one marks the
        request done. An exception of ``on_event`` propagates to the engine."""
        if event.finished:
            self._done.set()
        self._events.put(event)
        if self._on_event is not None:
            self._on_event(event)

    def mark_cancelled(self) -> None:
        """Flag the request as cancelled without waking the engine (engine side: the engine is the
        one cancelling it, e.g. after its ``on_event`` callback failed)."""
        self._cancel.set()
